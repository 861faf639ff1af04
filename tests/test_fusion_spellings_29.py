"""Issue 29's spellings from other frameworks, each on a small hand-built graph fused and checked
in ONNX Runtime like those of test_fusion_spellings: Flax/JAX's variance as E[x^2] - E[x]^2, and
a scale and bias reached through an Identity."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import op_types, ort_run
from test_fusion_spellings import (BIAS, CONSTANTS, EPS, SCALE, _const, _divide, _x, attribute, fused, fused_node,
                                   layer_norm, model, node, reduce, reference_ln, refused, statuses)


def flax_layer_norm(square="mul", mean_square="mul", clamp=True, divide="reciprocal"):
    """flax.linen.LayerNorm as jax2onnx/tf2onnx write it: var = max(E[x^2] - E[x]^2, 0)."""
    CONSTANTS["zero"] = _const("zero", 0.0)
    nodes = reduce("ReduceMean", "x", "mean")
    nodes += [node("Mul", ["x", "x"], "xx")] if square == "mul" else [node("Pow", ["x", "two"], "xx")]
    nodes += reduce("ReduceMean", "xx", "mean2")
    nodes += [node("Mul", ["mean", "mean"], "mm")] if mean_square == "mul" else [node("Pow", ["mean", "two"], "mm")]
    nodes += [node("Sub", ["mean2", "mm"], "var0")]
    nodes += [node("Max", ["var0", "zero"], "var")] if clamp else [node("Identity", ["var0"], "var")]
    nodes += [node("Sub", ["x", "mean"], "d"), node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std")]
    return nodes + _divide(divide, "d", "std", "normed") + [
        node("Mul", ["normed", "scale"], "scaled"), node("Add", ["scaled", "bias"], "y")]


FLAX_SPELLINGS = {
    "mul-mul-max-reciprocal": {},
    "pow-pow-max-div": {"square": "pow", "mean_square": "pow", "divide": "div"},
    "no-clamp-one-div": {"clamp": False, "divide": "one-div"},
}


@pytest.mark.parametrize("spelling", FLAX_SPELLINGS.values(), ids=FLAX_SPELLINGS.keys())
def test_flax_variance_as_mean_square_minus_squared_mean_is_one_layer_norm(spelling):
    nodes = flax_layer_norm(**spelling)
    if not spelling.get("clamp", True):  # no Identity either: the Sub feeds the epsilon's Add
        nodes = [n for n in nodes if n.op_type != "Identity"]
        nodes[[n.output[0] for n in nodes].index("ve")].input[0] = "var0"
    result = fused(model(nodes))
    assert statuses(result) == [("LayerNorm", "fused")] and op_types(result.model) == ["LayerNormalization"]
    assert attribute(fused_node(result), "epsilon") == pytest.approx(EPS)
    assert len(fused_node(result).input) == 3  # the scale and bias went inside
    np.testing.assert_allclose(ort_run(result.model, {"x": _x()})["y"], reference_ln(_x()), atol=1e-5)


def test_a_flax_variance_clamped_at_something_other_than_zero_is_refused():
    CONSTANTS["floor"] = _const("floor", 0.5)
    nodes = flax_layer_norm()
    nodes[[n.output[0] for n in nodes].index("var")].input[1] = "floor"
    assert refused(model(nodes)) == [("LayerNorm", "refused", "the variance is clamped at something other than 0")]


def test_scale_and_bias_behind_an_identity_are_absorbed():
    """Issue 29: an Identity between the initializer and the Mul/Add (values.constant follows it)."""
    nodes = [node("Identity", ["scale"], "scale_i"), node("Identity", ["bias"], "bias_i"), *layer_norm()]
    for n in nodes:
        n.input[:] = [{"scale": "scale_i", "bias": "bias_i"}.get(i, i) if n.op_type != "Identity" else i
                      for i in n.input]
    result = fused(model(nodes))
    assert op_types(result.model) == ["LayerNormalization"] and len(fused_node(result).input) == 3
    np.testing.assert_allclose(ort_run(result.model, {"x": _x()})["y"], reference_ln(_x()), atol=1e-5)


def keras_layer_norm(gamma=True, orders=False):
    """tf.keras LayerNormalization through tf.nn.batch_normalization, as tf2onnx writes it: the
    scale and bias folded into x * g + (beta - mean * g), g = gamma * rsqrt(var + eps)."""
    # StopGradient(mean) is an Identity that tf2onnx's optimizer removes
    nodes = reduce("ReduceMean", "x", "mean") + [node("Sub", ["x", "mean"], "d"), node("Mul", ["d", "d"], "sq")]
    nodes += reduce("ReduceMean", "sq", "var") + [node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std"),
                                                  node("Reciprocal", ["std"], "inv" if gamma else "g")]
    nodes += [node("Mul", ["scale", "inv"] if orders else ["inv", "scale"], "g")] if gamma else []
    return nodes + [node("Mul", ["g", "x"] if orders else ["x", "g"], "xg"), node("Mul", ["mean", "g"], "mg"),
                    node("Sub", ["bias", "mg"], "off"), node("Add", ["off", "xg"] if orders else ["xg", "off"], "y")]


@pytest.mark.parametrize("spelling", [{}, {"orders": True}, {"gamma": False}], ids=["tf2onnx", "swapped", "no-gamma"])
def test_keras_folded_scale_and_offset_are_one_layer_norm(spelling):
    result = fused(model(keras_layer_norm(**spelling)))
    assert statuses(result) == [("LayerNorm", "fused")] and op_types(result.model) == ["LayerNormalization"]
    expected = reference_ln(_x(), scale=SCALE if spelling.get("gamma", True) else 1.0)
    np.testing.assert_allclose(ort_run(result.model, {"x": _x()})["y"], expected, atol=1e-5)


def test_a_scale_after_the_folded_offset_is_composed_into_the_fused_one():
    nodes = keras_layer_norm()
    nodes[-1] = node("Add", ["xg", "off"], "y0")
    result = fused(model(nodes + [node("Mul", ["y0", "scale"], "y1"), node("Add", ["y1", "bias"], "y")]))
    assert op_types(result.model) == ["LayerNormalization"]
    np.testing.assert_allclose(ort_run(result.model, {"x": _x()})["y"], reference_ln(_x()) * SCALE + BIAS, atol=1e-5)


def test_a_folded_scale_that_is_fed_is_refused():
    nodes = keras_layer_norm()
    nodes[[n.output[0] for n in nodes].index("g")].input[:] = ["inv", "scale_in"]
    fed = helper.make_tensor_value_info("scale_in", TensorProto.FLOAT, [8])
    feeds = {"x": _x(), "scale_in": SCALE}
    assert refused(model(nodes, inputs=[fed]), feeds) == [
        ("LayerNorm", "refused", "the folded scale or offset is not a per-feature constant")]


def test_a_flax_mean_raised_to_another_power_is_refused():
    CONSTANTS["three"] = _const("three", 3.0)
    nodes = flax_layer_norm(mean_square="pow")
    nodes[[n.output[0] for n in nodes].index("mm")].input[1] = "three"
    assert refused(model(nodes)) == [("LayerNorm", "refused", "the mean is raised to a power other than 2")]


def test_a_folded_layer_norm_in_an_fp32_island_is_one_fp16_node():
    nodes = [node("Cast", ["x"], "x32", to=TensorProto.FLOAT), *keras_layer_norm()]
    for n in nodes[1:]:
        n.input[:] = ["x32" if i == "x" else i for i in n.input]
    nodes[-1] = node("Add", ["xg", "off"], "y32")
    nodes.append(node("Cast", ["y32"], "y", to=TensorProto.FLOAT16))
    result = fused(model(nodes, dtype=TensorProto.FLOAT16), feeds={"x": _x(dtype=np.float16)})
    assert op_types(result.model) == ["LayerNormalization"]
    assert attribute(fused_node(result), "stash_type") == 1
