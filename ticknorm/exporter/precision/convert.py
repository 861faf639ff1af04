"""Convert an fp32 graph to fp16 or bf16 and prove it, before anything is written.

The plan is measured on the caller's feeds; the converted graph is judged against the reference
(PyTorch's fp32 outputs in an export, the fp32 graph's own in `convert`) at the low type's
tolerance: always through the fp32 emulation, which ONNX Runtime's CPU provider runs for both
types and where an overflow cannot hide (the CPU provider computes many fp16 ops in fp32 and drops
the Casts between them); for fp16 also as the strongly typed graph itself."""

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ticknorm.base.errors import AccuracyError
from ticknorm.base.graph import typed
from ticknorm.base.inputs import graph_feeds
from ticknorm.base.metrics import ArrayComparison, ResolvedTolerance, Tolerance, compare_arrays
from ticknorm.base.precision import LOW_TYPES, TYPE_NAMES, Precision
from ticknorm.exporter.precision.keep import suggestion
from ticknorm.exporter.precision.lower import lay_out, low_array, write_emulated, write_low
from ticknorm.exporter.precision.plan import plan_precision
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner


@dataclass
class Conversion:
    model: onnx.ModelProto  # the strongly typed low-precision graph
    precision: Precision  # with the measured islands
    checks: list[ArrayComparison] = field(default_factory=list)  # per output and way of running

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def summary(self) -> str:
        precision = self.precision
        io_type = "fp32" if precision.io_types == "fp32" else precision.dtype
        lines = [f"{precision.dtype}: {len(precision.islands)} node(s) kept in fp32, I/O {io_type}"]
        lines += ["  " + line for line in precision.island_lines()]
        lines += ["  " + check.line() for check in self.checks]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"precision": asdict(self.precision), "checks": [asdict(check) for check in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float)


def convert(model: onnx.ModelProto, feeds: dict, precision: Precision, reference: dict | None = None,
            weights_dir=None) -> Conversion:
    """`model` (fp32) in `precision.dtype` with measured fp32 islands, checked against `reference`
    (name -> fp32 output; the fp32 graph's own run when None). Raises AccuracyError, naming the
    output and what to keep in fp32, when the converted graph computes other numbers."""
    feeds = graph_feeds(model, feeds)
    planned = plan_precision(model, feeds, precision, weights_dir)
    if reference is None:
        reference = _run(model, feeds, weights_dir, "all")
    lowering = lay_out(model, planned)  # one layout for both graphs
    conversion = Conversion(write_low(lowering, weights_dir), planned)
    tolerance = Tolerance().at(TYPE_NAMES[planned.dtype])
    emulated = _run(write_emulated(lowering, weights_dir), feeds, weights_dir, "disabled")
    conversion.checks += _judged(reference, emulated, tolerance, f"{planned.dtype} emulated in fp32")
    if planned.dtype == "fp16":  # ONNX Runtime's CPU provider runs fp16 graphs (not bf16 ones)
        low_feeds = {name: _fed(value, conversion.model, name, planned.dtype) for name, value in feeds.items()}
        actual = _run(conversion.model, low_feeds, weights_dir, "all")
        conversion.checks += _judged(reference, actual, tolerance, "fp16 graph, ONNX Runtime CPU")
    failed = next((check for check in conversion.checks if not check.passed), None)
    if failed is not None:
        output = next(name for name in reference if failed.name.startswith(f"{name} ("))
        suggested = suggestion(typed(model).graph, lowering.low_nodes, output)
        raise AccuracyError(f"the {planned.dtype} graph disagrees with the fp32 reference on {failed.name}: "
                            f"{failed.reason}; keep what drifts in fp32, e.g. {suggested or '--keep-fp32 GLOB'}; "
                            "compare --per-layer names the module that drifts; nothing was written")
    return conversion


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], weights_dir, optimization: str) -> dict[str, np.ndarray]:
    with OrtRunner(model, optimization=optimization, mapped=MappedWeights.staged(weights_dir)) as runner:
        return runner.infer(feeds).outputs


def _judged(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], tolerance: ResolvedTolerance,
            label: str) -> list[ArrayComparison]:
    return [compare_arrays(f"{name} ({label})", expected, np.asarray(actual[name]), *tolerance.of(name))
            for name, expected in reference.items()]


def _fed(value: np.ndarray, model: onnx.ModelProto, name: str, dtype: str) -> np.ndarray:
    """A float feed in the type the converted graph's input takes (low with `--io-types low`)."""
    declared = next((i.type.tensor_type.elem_type for i in model.graph.input if i.name == name), None)
    return low_array(value, dtype) if declared == LOW_TYPES[dtype] else value
