"""Convert an fp32 graph to fp16 or bf16 and prove it, before anything is written.

The plan is measured on the caller's feeds; the converted graph is judged against the reference
(PyTorch's fp32 outputs in an export, the fp32 graph's own in `convert`) at the low type's
tolerance. The verdict is the strongly typed graph itself run in ONNX Runtime (its CPU provider
runs most fp16 graphs): an emulation in fp32 rounds where the real graph does not (a foreign
graph's conversion was rejected at 0.034 by it while its fp16 graph ran at 0.0034). Where ONNX
Runtime cannot run the graph (no bf16 kernels on the CPU provider, an op without a kernel in the
type) the fp32 emulation, which it runs for both types, is the verdict, and the report says so."""

import contextlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ticknorm.base.errors import AccuracyError, OnnxFileError, RuntimeFailure
from ticknorm.base.graph import typed
from ticknorm.base.inputs import graph_feeds
from ticknorm.base.metrics import ArrayComparison, ResolvedTolerance, Tolerance, compare_arrays
from ticknorm.base.precision import LOW_TYPES, PRECISION_KEY, TYPE_NAMES, Precision
from ticknorm.exporter.precision.keep import suggestion
from ticknorm.exporter.precision.lower import Lowering, lay_out, low_array, write_emulated, write_low
from ticknorm.exporter.precision.plan import plan_precision
from ticknorm.exporter.precision.share import WeightShare, weight_share
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner


@dataclass
class Conversion:
    model: onnx.ModelProto  # the strongly typed low-precision graph
    precision: Precision  # with the measured islands
    checks: list[ArrayComparison] = field(default_factory=list)  # per output, of the run that judged
    judged_by: str = ""  # that run: the graph itself in ONNX Runtime, or its fp32 emulation and why
    # Beside a real run's verdict, the emulation's checks: where they fail, ONNX Runtime's CPU provider
    # computed in fp32 what a strongly typed engine (TensorRT, the CUDA provider) holds in the low type.
    emulation: list[ArrayComparison] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def weights(self) -> WeightShare:
        return weight_share(self.model, self.precision.dtype)

    def summary(self) -> str:
        precision = self.precision
        io_type = "fp32" if precision.io_types == "fp32" else precision.dtype
        lines = [f"{precision.dtype}: {len(precision.islands)} node(s) kept in fp32, I/O {io_type}",
                 f"  {self.weights.line()}"]
        lines += ["  " + line for line in precision.island_lines()]
        lines += [f"  judged by {self.judged_by}"] if self.judged_by else []
        lines += ["  " + check.line() for check in self.checks]
        disagreeing = [check for check in self.emulation if not check.passed]
        if disagreeing:
            lines += [f"  note: the {precision.dtype} emulation in fp32 (every value rounded as a strongly typed "
                      "engine holds it; ONNX Runtime's CPU provider computes some of these ops in fp32) disagrees, "
                      "not the verdict:"]
            lines += ["    " + check.line() for check in disagreeing]
        return "\n".join(lines)

    def partial_failure(self, output) -> str | None:
        """Why a conversion that left most of the float weights in fp32 fails (`--allow-partial`
        accepts it); None for one that converted at least half."""
        share = self.weights
        if not share.partial:
            return None
        return (f"only {share.fraction:.1%} of the float weights (by size) are {share.dtype} in {output} "
                f"({share.low_tensors} of {share.tensors} tensors; the islands above say what stayed fp32); "
                "the file is written: --allow-partial accepts a partial conversion")

    def to_dict(self) -> dict:
        share = self.weights
        return {"precision": asdict(self.precision), "judged_by": self.judged_by,
                "weights": {**asdict(share), "fraction": share.fraction, "partial": share.partial},
                "checks": [asdict(check) for check in self.checks],
                "emulation": [asdict(check) for check in self.emulation]}

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
    _judge(conversion, lowering, feeds, reference, weights_dir)
    failed = next((check for check in conversion.checks if not check.passed), None)
    if failed is not None:
        output = next(name for name in reference if failed.name.startswith(f"{name} ("))
        suggested = suggestion(typed(model).graph, lowering.low_nodes, output)
        raise AccuracyError(f"the {planned.dtype} graph disagrees with the fp32 reference on {failed.name}: "
                            f"{failed.reason}; keep what drifts in fp32, e.g. {suggested or '--keep-fp32 GLOB'}; "
                            "compare --per-layer names the module that drifts; nothing was written")
    return conversion


def _judge(conversion: Conversion, lowering: Lowering, feeds: dict[str, np.ndarray],
           reference: dict[str, np.ndarray], weights_dir) -> None:
    """The real graph's run is the verdict where ONNX Runtime runs it, else the emulation's."""
    dtype = conversion.precision.dtype
    tolerance = Tolerance().at(TYPE_NAMES[dtype])
    emulated = _run(write_emulated(lowering, weights_dir), feeds, weights_dir, "disabled")
    emulation = _judged(reference, emulated, tolerance, f"{dtype} emulated in fp32")
    actual, why = _real_run(conversion.model, feeds, weights_dir, dtype)
    if actual is None:
        conversion.judged_by, conversion.checks = f"its emulation in fp32 ({why})", emulation
        return
    conversion.judged_by = f"the {dtype} graph itself, run by ONNX Runtime (CPU){why}"
    conversion.checks = _judged(reference, actual, tolerance, f"{dtype} graph, ONNX Runtime CPU")
    conversion.emulation = emulation


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], weights_dir, optimization: str) -> dict[str, np.ndarray]:
    with OrtRunner(model, optimization=optimization, mapped=MappedWeights.staged(weights_dir)) as runner:
        return runner.infer(feeds).outputs


def _real_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], weights_dir,
              dtype: str) -> tuple[dict[str, np.ndarray] | None, str]:
    """The low-precision graph's outputs from ONNX Runtime's CPU provider, as a deployment loads it
    (every graph optimization on), or None and why it cannot run it (a session it cannot create:
    no kernel for an op in the type; a run that fails). Where only ONNX Runtime's own optimizer
    fails on the file (its LayerNorm fusion binds a decomposed norm next to an fp32 island to two
    types), the graph runs with optimizations off, and what follows the verdict says so: a
    deployment loading it the default way would fail."""
    low_feeds = {name: _fed(value, model, name, dtype) for name, value in feeds.items()}
    with _as_itself(model):
        try:
            return _run(model, low_feeds, weights_dir, "all"), ""
        except (OnnxFileError, RuntimeFailure) as exc:
            refused = f"ONNX Runtime cannot run the {dtype} graph: {exc}"
            if "NOT_IMPLEMENTED" in str(exc):
                return None, refused
        try:
            return _run(model, low_feeds, weights_dir, "disabled"), (
                f" with graph optimizations off; WARNING: with them on, as by default, it fails to load the "
                f"file ({refused}): fuse the norms first (ticknorm fuse), or load it with "
                f"optimizations off")
        except (OnnxFileError, RuntimeFailure):
            return None, refused


@contextlib.contextmanager
def _as_itself(model: onnx.ModelProto):
    """`model` without its precision metadata while it runs: the runner runs a graph marked bf16 as
    its fp32 emulation (`upcast`), and the verdict asks for the graph itself."""
    marks = [prop for prop in model.metadata_props if prop.key == PRECISION_KEY]
    for prop in marks:
        model.metadata_props.remove(prop)
    try:
        yield
    finally:
        model.metadata_props.extend(marks)


def _judged(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], tolerance: ResolvedTolerance,
            label: str) -> list[ArrayComparison]:
    return [compare_arrays(f"{name} ({label})", expected, np.asarray(actual[name]), *tolerance.of(name))
            for name, expected in reference.items()]


def _fed(value: np.ndarray, model: onnx.ModelProto, name: str, dtype: str) -> np.ndarray:
    """A float feed in the type the converted graph's input takes (low with `--io-types low`)."""
    declared = next((i.type.tensor_type.elem_type for i in model.graph.input if i.name == name), None)
    return low_array(value, dtype) if declared == LOW_TYPES[dtype] else value
