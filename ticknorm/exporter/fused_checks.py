"""Each fused attention op checked against the PyTorch module it stands for, on every check of
the export (the example step, the prefill, each decode step), as each fused norm is checked
against the nodes it replaced.

The final outputs and the present keys and values already pass through every op; this names the
module where they would part: the module's output in PyTorch (a hook) beside the tensor the scope
map names its output in the graph (`model.layers.N.self_attn`: the op, then the output
projection), both runs on the same feeds. Run on the exported graph before the norms are fused
and the model's weights released: the norms' own verification covers what fusion changes after.
"""

from dataclasses import dataclass

import numpy as np
import onnx

from ticknorm.base.errors import AccuracyError
from ticknorm.base.inputs import graph_feeds
from ticknorm.base.metrics import ArrayComparison, compare_arrays, dtype_tolerance
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner
from ticknorm.runtime.torch_runner import TorchRunner


@dataclass(frozen=True)
class FusedChecks:
    """Every fused module's output on every check, PyTorch vs ONNX Runtime."""

    comparisons: list[ArrayComparison]
    modules: int
    steps: int

    def line(self) -> str:
        worst = max(self.comparisons, key=lambda c: c.max_abs)
        return (f"fused attention checked per module against PyTorch: {self.modules} modules x {self.steps} steps, "
                f"worst max abs {worst.max_abs:.3g} at {worst.name}")


def check_fused_modules(proto: onnx.ModelProto, model, paths: list[str], checks: list[tuple[str, dict]],
                        weights_dir) -> FusedChecks:
    """Compare each module of `paths` on each `(label, feeds)` of `checks`; raises AccuracyError
    (nothing is written) where one disagrees beyond fp32's tolerance."""
    atol, rtol = dtype_tolerance(np.float32)
    names = [output.name for output in proto.graph.output]
    comparisons: list[ArrayComparison] = []
    untapped = set(paths)
    with TorchRunner(model, names, taps=paths) as torch_runner, \
            OrtRunner(proto, mapped=MappedWeights.staged(weights_dir), taps=paths) as ort_runner:
        for label, feeds in checks:
            expected = torch_runner.infer(feeds).taps
            got = ort_runner.infer(graph_feeds(proto, feeds)).taps
            tapped = [path for path in paths if path in expected and path in got]
            untapped -= set(tapped)
            comparisons += [compare_arrays(f"{path} ({label or 'the example step'})", expected[path], got[path],
                                           atol, rtol) for path in tapped]
    if not paths or untapped:
        missing = ", ".join(sorted(untapped)) or "no module"
        raise AccuracyError(f"a fused attention could not be checked: {missing} has no output of its own in the "
                            "graph; nothing was written (export with --target plain)")
    failed = next((c for c in comparisons if not c.passed), None)
    if failed is not None:
        raise AccuracyError(f"a fused attention disagrees with its PyTorch module: {failed.line()}; nothing was "
                            "written (export with --target plain)")
    return FusedChecks(comparisons, len(paths), len(checks))
