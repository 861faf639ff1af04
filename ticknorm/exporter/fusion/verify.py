"""Prove a fused graph computes what the original computed, before anything is written.

Both graphs run in ONNX Runtime on the same seeded inputs: the original with its graph
optimizations off (so ORT's own fusions cannot stand in for the decomposed norms it is the
reference for), the fused one as a deployment runs it (every optimization on). Compared: every
graph output and the output of every fused normalization, which survives fusion under its
original name. The fused run's graph outputs are returned too, so an export compares them with
PyTorch instead of building a third session for the same numbers.

Seeded inputs are ordinary rows; the rows where a fused op and its decomposition part are not.
So both graphs also run edge rows: every float input all zeros, all one constant, scaled to
around 1e4 and to around 1e-6 (an epsilon the fused attribute cannot hold gives NaN on a zero
row, where the original gives the bias). The fused norms' outputs must match there too, NaN and
Inf too; only where the original overflows (an fp16 square at 1e4) may the fused op be finite
instead. A mismatch fails the check with the row it failed on.
"""

from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir

from ticknorm.base.graph import coarsest_float, typed
from ticknorm.base.metrics import ArrayComparison, compare_arrays, dtype_tolerance
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner


@dataclass
class Verification:
    checks: dict[str, ArrayComparison]  # by tensor, fused vs original
    outputs: list[dict[str, np.ndarray]]  # the fused graph's outputs on `feeds`, then on each of `also`


def verify_fused(original: onnx.ModelProto, fused: onnx.ModelProto, tensors: dict[str, int],
                 feeds: dict[str, np.ndarray], weights_dir=None, also=()) -> Verification:
    """`tensors` maps each tensor to check (outputs of fused nodes) to its element type. The two
    sessions run one after the other, so only one holds the weights at a time; the fused one also
    runs each feed dict of `also` (an export's other checks) while it is open."""
    edges = edge_feeds(feeds)
    with OrtRunner(original, optimization="disabled", mapped=MappedWeights.staged(weights_dir),
                   extra_outputs=list(tensors)) as runner:
        expected = runner.infer(feeds).outputs
        expected_edges = [runner.infer(edge).outputs for edge in edges.values()]
    with OrtRunner(fused, mapped=MappedWeights.staged(weights_dir), extra_outputs=list(tensors)) as runner:
        actual = runner.infer(feeds).outputs
        outputs = [actual] + [runner.infer(more).outputs for more in also]
        actual_edges = [runner.infer(edge).outputs for edge in edges.values()]
    values = ir.convenience.create_value_mapping(typed(original).graph, include_subgraphs=False)
    tolerances = {}
    for name, reference in expected.items():
        coarsest = (coarsest_float(values[name]) if name in values else None) or tensors.get(name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(coarsest) if coarsest else reference.dtype
        tolerances[name] = dtype_tolerance(dtype)
    checks = {name: compare_arrays(name, reference, actual[name], *tolerances[name])
              for name, reference in expected.items()}
    for row, reference_run, actual_run in zip(edges, expected_edges, actual_edges):
        for name in tensors:
            check = _edge_check(name, reference_run[name], actual_run[name], tolerances[name])
            if checks[name].passed and not check.passed:
                checks[name] = replace(check, reason=f"changes the numbers on {row}: {check.reason}")
    graph_outputs = [o.name for o in fused.graph.output]
    return Verification(checks, [{name: run[name] for name in graph_outputs} for run in outputs])


def edge_feeds(feeds: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """`feeds` with every float input's rows made edge rows, by the row they are (integer inputs,
    token ids and masks, kept: they must stay valid). Empty when no input is float."""
    floats = [name for name, array in feeds.items() if np.asarray(array).dtype.kind == "f"]
    if not floats:
        return {}
    rows = {"an all-zero row": lambda a: np.zeros_like(a), "a constant row": lambda a: np.full_like(a, 0.5),
            "a row around 1e4": lambda a: a * a.dtype.type(1e4), "a row around 1e-6": lambda a: a * a.dtype.type(1e-6)}
    return {row: {name: (make(np.asarray(array)) if name in floats else array) for name, array in feeds.items()}
            for row, make in rows.items()}


def _edge_check(name: str, reference: np.ndarray, actual: np.ndarray,
                tolerance: tuple[float, float]) -> ArrayComparison:
    """Compared where the original is finite: where it overflowed, a fused op that did not is no fault."""
    if reference.shape == actual.shape and reference.dtype.kind == "f":
        finite = np.isfinite(reference)
        reference, actual = reference[finite], actual[finite]
    return compare_arrays(name, reference, actual, *tolerance)
