"""Prove a fused graph computes what the original computed, before anything is written.

Both graphs run in ONNX Runtime with its graph optimizations off (so ORT's own fusions cannot hide
a wrong rewrite), on the same seeded inputs. Compared: every graph output and the output of every
fused normalization, which survives fusion under its original name.
"""

import numpy as np
import onnx

from ticknorm.base.graph import GraphIndex
from ticknorm.base.metrics import ArrayComparison, compare_arrays, dtype_tolerance
from ticknorm.runtime.ort_runner import OrtRunner

def verify_fused(original: onnx.ModelProto, fused: onnx.ModelProto, tensors: dict[str, int],
                 feeds: dict[str, np.ndarray], weights_dir=None) -> dict[str, ArrayComparison]:
    """`tensors` maps each tensor to check (outputs of fused nodes) to its element type. The two
    sessions run one after the other, so only one holds the weights at a time."""
    expected = _run_with_outputs(original, feeds, tensors, weights_dir)
    actual = _run_with_outputs(fused, feeds, tensors, weights_dir)
    index = GraphIndex(original)
    checks = {}
    for name, reference in expected.items():
        coarsest = index.coarsest_float_upstream(name) or tensors.get(name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(coarsest) if coarsest else reference.dtype
        checks[name] = compare_arrays(name, reference, actual[name], *dtype_tolerance(dtype))
    return checks


def _run_with_outputs(model: onnx.ModelProto, feeds: dict, extra: dict[str, int], weights_dir) -> dict[str, np.ndarray]:
    with OrtRunner(model, optimization="disabled", weights_dir=weights_dir, extra_outputs=list(extra)) as runner:
        return runner.infer(feeds).outputs
