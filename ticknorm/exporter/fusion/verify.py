"""Prove a fused graph computes what the original computed, before anything is written.

Both graphs run in ONNX Runtime with its graph optimizations off (so ORT's own fusions cannot hide
a wrong rewrite), on the same seeded inputs. Compared: every graph output and the output of every
fused normalization, which survives fusion under its original name.
"""

import numpy as np
import onnx

from ticknorm.runtime.ort_runner import OrtRunner
from ticknorm.base.metrics import ArrayComparison, compare_arrays

# |fused - original| <= atol + rtol * |original|, by the dtype the tensor is computed in.
TOLERANCES = {
    onnx.TensorProto.FLOAT: (1e-4, 1e-3),
    onnx.TensorProto.DOUBLE: (1e-8, 1e-7),
    onnx.TensorProto.FLOAT16: (1e-2, 1e-2),
    onnx.TensorProto.BFLOAT16: (5e-2, 5e-2),
}


def verify_fused(original: onnx.ModelProto, fused: onnx.ModelProto, tensors: dict[str, int],
                 feeds: dict[str, np.ndarray], weights_dir=None) -> dict[str, ArrayComparison]:
    """`tensors` maps each tensor to check (outputs of fused nodes) to its element type. The two
    sessions run one after the other, so only one holds the weights at a time."""
    expected = _run_with_outputs(original, feeds, tensors, weights_dir)
    actual = _run_with_outputs(fused, feeds, tensors, weights_dir)
    checks = {}
    for name, reference in expected.items():
        elem_type = tensors.get(name) or onnx.helper.np_dtype_to_tensor_dtype(reference.dtype)
        checks[name] = compare_arrays(name, reference, actual[name], *TOLERANCES.get(elem_type, (0.0, 0.0)))
    return checks


def _run_with_outputs(model: onnx.ModelProto, feeds: dict, extra: dict[str, int], weights_dir) -> dict[str, np.ndarray]:
    result = OrtRunner(model, optimization="disabled", weights_dir=weights_dir).infer(feeds, taps=list(extra))
    return {**result.outputs, **result.taps}
