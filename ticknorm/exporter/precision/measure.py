"""The fp32 reference run the precision policy is measured on: every float tensor of the graph,
its largest finite magnitude and the share of its values the low type cannot hold as normal numbers, and
the statistics norms and reductions compute inside themselves (a variance can overflow fp16
although every input fits: |x| > 256 already gives x^2 > 65504)."""

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from ticknorm.base.errors import InputSpecError
from ticknorm.base.graph import typed
from ticknorm.base.precision import SMALLEST_NORMAL
from ticknorm.exporter.precision.bodies import planned_graphs, planned_nodes
from ticknorm.exporter.precision.measure_bodies import body_reads, body_values
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner

NORM_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
# Reductions whose running sum is larger than their result: the sum is what a low-precision
# accumulator holds.
SUMMING_REDUCTIONS = ("ReduceMean", "ReduceL2")


@dataclass(frozen=True)
class TensorRange:
    absmax: float
    underflow: float  # share of the nonzero values below the low type's smallest normal


@dataclass
class Measurement:
    tensors: dict[str, TensorRange]  # by float tensor (node outputs, graph inputs, initializers)
    # by index in `planned_nodes`: (what, largest): a norm's variance, a reduction's sum
    statistics: dict[int, tuple[str, float]]


def measure(model: onnx.ModelProto, view: ir.Model, feeds: dict, dtype: str, weights_dir=None) -> Measurement:
    """Run `model` in fp32 (ONNX Runtime, optimizations off, every float tensor of its typed
    `view` an output), and the bodies the run went through (`measure_bodies`)."""
    return measurement(view, values_of(model, fetched(view), feeds, weights_dir), dtype)


def values_of(model: onnx.ModelProto, fetch: list[str], feeds: dict, weights_dir=None) -> dict[str, np.ndarray]:
    """The feeds, the `fetch` tensors and what the bodies read of one fp32 run, with the tensors of
    the bodies it went through, each run alone the same way."""
    with OrtRunner(model, optimization="disabled", mapped=MappedWeights.staged(weights_dir),
                   extra_outputs=[*fetch, *body_reads(model)]) as runner:
        values = {**feeds, **runner.infer(feeds).outputs}

    def run(alone: onnx.ModelProto, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return values_of(alone, fetched(typed(alone)), given, weights_dir)

    return {**values, **body_values(model, values, run)}


def measurement(view: ir.Model, values: dict[str, np.ndarray], dtype: str) -> Measurement:
    """The ranges and statistics of an fp32 run's float tensors (`values`: name -> array, from one
    session or from a graph run piece by piece)."""
    floats = [*fetched(view), *_body_floats(view)]
    outputs = {value.name for value in view.graph.outputs}
    bad = [name for name in floats if name in values and _unusable(values[name], name in outputs)]
    if bad:
        raise InputSpecError(f"the fp32 run already holds NaN or Inf (first in '{bad[0]}') on these inputs: there "
                             "is no reference to choose a precision from")
    smallest = SMALLEST_NORMAL.get(dtype, 0.0)
    tensors = {name: _range(values[name], smallest) for name in floats if name in values}
    for graph in planned_graphs(view.graph):
        for name, weight in graph.initializers.items():
            tensor = weight.const_value
            if tensor is not None and tensor.dtype == ir.DataType.FLOAT and not isinstance(tensor, ir.ExternalTensor):
                tensors[name] = _range(tensor.numpy(), smallest)
    statistics: dict[int, tuple[str, float]] = {}
    for position, (node, _) in enumerate(planned_nodes(view.graph)):
        found = _statistic(node, values)
        if found is not None:
            statistics[position] = found
    return Measurement(tensors, statistics)


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """The graph's float32 inputs and node outputs (what a measured run fetches)."""
    return fetched(typed(model))


def fetched(view: ir.Model) -> list[str]:
    """`float_tensors` of a typed view."""
    graph = view.graph
    values = [*graph.inputs, *(out for node in graph for out in node.outputs if out.name)]
    return [name for name, value in {v.name: v for v in values}.items()
            if name is not None and value.dtype == ir.DataType.FLOAT and name not in graph.initializers]


def _body_floats(view: ir.Model) -> list[str]:
    """The float tensors of the graph's If, Loop and Scan bodies (those a body run gives)."""
    values = [value for body in planned_graphs(view.graph)[1:]
              for value in [*body.inputs, *(out for node in body for out in node.outputs)]]
    return [value.name for value in values if value.name and value.dtype == ir.DataType.FLOAT]


def _unusable(array: np.ndarray, output: bool) -> bool:
    """Whether an fp32 run's tensor leaves no reference: NaN anywhere, or an infinity in a graph
    output. An infinity inside the graph is a mask by design (`Where(mask, 0, -inf)` before a
    Softmax, whose outputs are finite), not a fault of the inputs."""
    return bool(np.isnan(array).any() or (output and np.isinf(array).any()))


def _range(array: np.ndarray, smallest: float) -> TensorRange:
    """The range of the finite values: an infinity (a mask's -inf) is held exactly by fp16 and bf16,
    so it is no reason to keep a tensor in fp32; a mask at float32's lowest finite value is (it
    exceeds fp16's range), and keeps its readers in fp32."""
    magnitude = np.abs(array.astype(np.float64)).reshape(-1)
    magnitude = magnitude[np.isfinite(magnitude)]
    nonzero = magnitude[magnitude > 0]
    underflow = float(np.mean(nonzero < smallest)) if nonzero.size else 0.0
    return TensorRange(float(magnitude.max()) if magnitude.size else 0.0, underflow)


def _value_of(value: ir.Value | None, values: dict[str, np.ndarray]) -> np.ndarray | None:
    """What the fp32 run gave `value`; None for a value it did not fetch (or an absent one)."""
    return values.get(value.name) if value is not None and value.name else None


def _statistic(node: ir.Node, values: dict[str, np.ndarray]) -> tuple[str, float] | None:
    x = _value_of(node.inputs[0] if node.inputs else None, values)
    if x is None or x.ndim == 0:
        return None
    x = x.astype(np.float64)
    if node.op_type in NORM_OPS:
        axes = tuple(range(node.attributes.get_int("axis", -1) % x.ndim, x.ndim))
        square_mean = float((x * x).mean(axis=axes).max())
        variance = float(x.var(axis=axes).max())
        return ("variance", variance) if variance >= square_mean else ("mean of squares", square_mean)
    output = _value_of(node.outputs[0], values)
    if node.op_type in SUMMING_REDUCTIONS and output is not None and output.size:
        count = x.size // output.size
        total = np.abs(output.astype(np.float64)).max() * count if node.op_type == "ReduceMean" else output.max() ** 2
        return (f"sum over {count} values", float(total))
    return None
