"""ticknorm: export a fine-tuned PyTorch model to ONNX with every LayerNorm fused, and prove it is
still the same model. `import ticknorm` needs only numpy and onnx; torch and the runtimes are
imported where used (a `Recorder` imports torch when it is built).

    import ticknorm
    result = ticknorm.export(model, (input_ids,), "model.onnx")
    report = ticknorm.compare("model.onnx", model, (input_ids,), runtimes=["ort"], layers=ticknorm.LayerSelection())
"""

__version__ = "0.1.0"

from ticknorm.api import (Judging, check, check_runtimes, compare, convert, export, fuse, history,  # noqa: E402
                          inspect, profile, report, runtimes, show_ticks, snapshot)
from ticknorm.base.errors import TicknormError  # noqa: E402
from ticknorm.base.inputs import Inputs  # noqa: E402
from ticknorm.base.metrics import Tolerance  # noqa: E402
from ticknorm.base.precision import Precision  # noqa: E402
from ticknorm.base.progress import Progress  # noqa: E402
from ticknorm.base.run_results import read_reference  # noqa: E402
from ticknorm.base.scopes import LayerSelection  # noqa: E402
from ticknorm.exporter.export import ExportOptions  # noqa: E402
from ticknorm.exporter.fusion import NormTargets  # noqa: E402
from ticknorm.exporter.model_ref import ModelRef  # noqa: E402
from ticknorm.profiler.profile import Timing  # noqa: E402
from ticknorm.runtime.registry import Runtimes  # noqa: E402
from ticknorm.ticks import Recorder  # noqa: E402

__all__ = ["ExportOptions", "Inputs", "Judging", "LayerSelection", "ModelRef", "NormTargets", "Precision", "Progress",
           "Recorder", "Runtimes", "TicknormError", "Timing", "Tolerance", "__version__", "check", "check_runtimes",
           "compare", "convert", "export", "fuse", "history", "inspect", "profile", "read_reference", "report",
           "runtimes", "show_ticks", "snapshot"]
