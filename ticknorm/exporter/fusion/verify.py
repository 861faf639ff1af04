"""Prove a fused graph computes what the original computed, before anything is written.

Both graphs run in ONNX Runtime on the same seeded inputs: the original with its graph
optimizations off (so ORT's own fusions cannot stand in for the decomposed norms it is the
reference for), the fused one as a deployment runs it (every optimization on). Compared: every
graph output and the output of every fused normalization, which survives fusion under its
original name. The fused run's graph outputs are returned too, so an export compares them with
PyTorch instead of building a third session for the same numbers.
"""

from dataclasses import dataclass

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
    with OrtRunner(original, optimization="disabled", mapped=MappedWeights.staged(weights_dir),
                   extra_outputs=list(tensors)) as runner:
        expected = runner.infer(feeds).outputs
    with OrtRunner(fused, mapped=MappedWeights.staged(weights_dir), extra_outputs=list(tensors)) as runner:
        actual = runner.infer(feeds).outputs
        outputs = [actual] + [runner.infer(more).outputs for more in also]
    values = ir.convenience.create_value_mapping(typed(original).graph, include_subgraphs=False)
    checks = {}
    for name, reference in expected.items():
        coarsest = (coarsest_float(values[name]) if name in values else None) or tensors.get(name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(coarsest) if coarsest else reference.dtype
        checks[name] = compare_arrays(name, reference, actual[name], *dtype_tolerance(dtype))
    graph_outputs = [o.name for o in fused.graph.output]
    return Verification(checks, [{name: run[name] for name in graph_outputs} for run in outputs])
