"""Issue 29's remaining shapes, each on a small hand-built graph fused and checked in ONNX Runtime
like those of test_fusion_spellings: Casts inside a mixed-precision LayerNorm, normalized dims
shape inference cannot give, integer exponents ONNX Runtime has no kernel for."""

import numpy as np
import pytest
from onnx import TensorProto

from conftest import op_types, ort_run
from test_fusion_spellings import (CONSTANTS, _const, _divide, _x, attribute, fused, fused_node, layer_norm, model, node,
                                   reduce, reference_ln, refused, statuses)
from ticknorm.base.errors import OnnxFileError
from ticknorm.exporter.fusion import fuse_norms

SCALE16, BIAS16 = (np.random.default_rng(5).standard_normal(8).astype(np.float16) for _ in range(2))


def mixed_layer_norm(lift_mean=False, cast_back=True, lift_to=TensorProto.FLOAT):
    """An fp16 LayerNorm that computes its variance and division in fp32: mean and x - mean in
    fp16, Cast up before the square and the division, Cast back after it, scale and bias in fp16.
    `lift_mean`: the mean too is taken in fp32, of x Cast up, and Cast back to fp16."""
    CONSTANTS.update(scale16=_const("scale16", SCALE16, np.float16), bias16=_const("bias16", BIAS16, np.float16))
    if lift_mean:
        nodes = [node("Cast", ["x"], "x32", to=TensorProto.FLOAT), *reduce("ReduceMean", "x32", "mean32"),
                 node("Cast", ["mean32"], "mean", to=TensorProto.FLOAT16)]
    else:
        nodes = reduce("ReduceMean", "x", "mean")
    nodes += [node("Sub", ["x", "mean"], "d"), node("Cast", ["d"], "d32", to=lift_to),
              node("Pow", ["d32", "two"], "sq"), *reduce("ReduceMean", "sq", "var"), node("Add", ["var", "eps"], "ve"),
              node("Sqrt", ["ve"], "std"), *_divide("div", "d32", "std", "n32")]
    nodes += [node("Cast", ["n32"], "n16", to=TensorProto.FLOAT16)] if cast_back else [
        node("Identity", ["n32"], "n16")]
    return nodes + [node("Mul", ["n16", "scale16"], "s16"), node("Add", ["s16", "bias16"], "y")]


def _fp16_reference(x):
    x = x.astype(np.float32)
    d = x - x.mean(-1, keepdims=True)
    return (d / np.sqrt((d * d).mean(-1, keepdims=True) + 1e-5) * SCALE16 + BIAS16).astype(np.float16)


@pytest.mark.parametrize("lift_mean", [False, True], ids=["fp16-mean", "mean-of-x-cast-up"])
def test_casts_inside_a_mixed_precision_layer_norm_are_one_fp16_node(lift_mean):
    feeds = {"x": _x(dtype=np.float16)}
    result = fused(model(mixed_layer_norm(lift_mean), dtype=TensorProto.FLOAT16), feeds=feeds)
    assert statuses(result) == [("LayerNorm", "fused")] and op_types(result.model) == ["LayerNormalization"]
    ln = fused_node(result)
    assert ln.input[0] == "x" and len(ln.input) == 3 and attribute(ln, "stash_type") == 1
    assert result.model.graph.initializer[0].data_type == TensorProto.FLOAT16  # the scale: an fp16 node
    notes = " ".join(result.report.records[0].notes)
    assert "Casts inside absorbed" in notes and "/Cast_d32" in notes and "Cast pair absorbed" in notes
    np.testing.assert_allclose(ort_run(result.model, feeds)["y"].astype(np.float32),
                               _fp16_reference(feeds["x"]).astype(np.float32), atol=1e-2)


def test_a_mixed_precision_layer_norm_left_in_fp32_is_refused_with_its_type():
    """No Cast back: the norm's output is fp32, which an fp16 LayerNormalization cannot give."""
    found = refused(model(mixed_layer_norm(cast_back=False), dtype=TensorProto.FLOAT16), {"x": _x(dtype=np.float16)})
    assert found[0][:2] == ("LayerNorm", "refused")
    assert "is float but its input 'x' is float16, and no Cast back follows" in found[0][2]


def test_a_cast_down_inside_a_layer_norm_is_refused():
    """An fp32 LayerNorm that takes its variance in fp16: the fused op would not round there."""
    CONSTANTS.update(two16=_const("two16", 2.0, np.float16), eps16=_const("eps16", 1e-5, np.float16))
    nodes = [*reduce("ReduceMean", "x", "mean"), node("Sub", ["x", "mean"], "d"),
             node("Cast", ["d"], "d16", to=TensorProto.FLOAT16), node("Pow", ["d16", "two16"], "sq"),
             *reduce("ReduceMean", "sq", "var"), node("Add", ["var", "eps16"], "ve"), node("Sqrt", ["ve"], "std"),
             node("Div", ["d16", "std"], "n16"), node("Cast", ["n16"], "y", to=TensorProto.FLOAT)]
    assert refused(model(nodes)) == [("LayerNorm", "refused", "a Cast from float to float16 inside the norm: the fused "
                                      "op computes in its input's float or in float32, so fusing would change the numbers")]


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32])
def test_an_integer_exponent_onnx_runtime_has_no_kernel_for_is_verified_in_the_reference_evaluator(dtype):
    """ONNX Runtime has no Pow kernel for an int8 or uint8 exponent: the original runs in onnx's
    reference evaluator instead, and the fused graph, which has no such Pow left, in ONNX Runtime."""
    name = f"two_{np.dtype(dtype).name}"
    CONSTANTS[name] = _const(name, 2, dtype)
    nodes = layer_norm()
    nodes[[n.output[0] for n in nodes].index("sq")].input[1] = name
    result = fuse_norms(model(nodes), feeds={"x": _x()})
    assert result.report.verified and op_types(result.model) == ["LayerNormalization"]
    notes = " ".join(result.report.records[0].notes)
    assert ("reference evaluator" in notes) == (dtype != np.int32)  # ORT's Pow takes int32 exponents
    np.testing.assert_allclose(ort_run(result.model, {"x": _x()})["y"], reference_ln(_x()), atol=1e-5)


def test_an_original_that_neither_runtime_can_run_is_one_clear_error():
    """The int8 Pow outside any norm: the fused graph still holds it, so ONNX Runtime cannot run it."""
    CONSTANTS["two_int8"] = _const("two_int8", 2, np.int8)
    nodes = [*layer_norm(out="y0"), node("Pow", ["y0", "two_int8"], "y")]
    with pytest.raises(OnnxFileError, match="NOT_IMPLEMENTED"):
        fuse_norms(model(nodes), feeds={"x": _x()})
