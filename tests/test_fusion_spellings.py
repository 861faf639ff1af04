"""Every spelling of LayerNorm and RMSNorm that fusion accepts, and the look-alikes it refuses with
their reasons, on small hand-built graphs run in ONNX Runtime. Exporters write these spellings; the
graphs here pin each one alone, so a change to the matcher is checked spelling by spelling."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import op_types, ort_run
from ticknorm.base.scopes import get_scope, set_scope
from ticknorm.exporter.fusion import NormTargets, fuse_norms

SHAPE = (2, 3, 8)
EPS = 1e-5
RNG = np.random.default_rng(7)
SCALE = RNG.standard_normal(8).astype(np.float32)
BIAS = RNG.standard_normal(8).astype(np.float32)


def node(op, inputs, outputs, **attrs):
    outputs = [outputs] if isinstance(outputs, str) else outputs
    return helper.make_node(op, inputs, outputs, name=f"/{op}_{outputs[0]}", **attrs)


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


CONSTANTS = {"eps": _const("eps", EPS), "two": _const("two", 2.0), "one": _const("one", 1.0),
             "scale": _const("scale", SCALE), "bias": _const("bias", BIAS), "n": _const("n", 8.0),
             "inv_n": _const("inv_n", 1 / 8), "axes": _const("axes", [-1], np.int64),
             "kept": _const("kept", [2, 3, 1], np.int64)}


def model(nodes, opset=17, shape=SHAPE, dtype=TensorProto.FLOAT, extra_outputs=(), inputs=()):
    """`x` in, `y` out, every constant a node reads from CONSTANTS."""
    read = {name for n in nodes for name in n.input}
    initializers = [tensor for name, tensor in CONSTANTS.items() if name in read]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, list(shape)), *inputs],
                              [helper.make_tensor_value_info(name, dtype, None) for name in ("y", *extra_outputs)],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def reduce(op, source, output, opset=17, keepdims=1, axes=(-1,)):
    """A reduction over `axes`, written as an attribute or an input as the opset wants."""
    if op == "ReduceMean" and opset < 18 or op == "ReduceSum" and opset < 13:
        return [node(op, [source], output, axes=list(axes), keepdims=keepdims)]
    name = f"{output}_axes"
    CONSTANTS[name] = _const(name, list(axes), np.int64)
    return [node(op, [source, name], output, keepdims=keepdims)]


def layer_norm(mean="keepdims", square="pow", divide="div", eps_first=False, affine="scale-bias", opset=17,
               source="x", out="y"):
    """A decomposed LayerNorm spelled as asked."""
    nodes = _mean(mean, source, "mean", opset) + [node("Sub", [source, "mean"], "d")]
    nodes += [node("Pow", ["d", "two"], "sq")] if square == "pow" else [node("Mul", ["d", "d"], "sq")]
    nodes += _mean(mean, "sq", "var", opset)
    nodes += [node("Add", ["eps", "var"] if eps_first else ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std")]
    nodes += _divide(divide, "d", "std", out if affine == "none" else "normed")
    return nodes + _affine(affine, "normed", out)


def _mean(spelling, source, output, opset):
    if spelling == "keepdims":
        return reduce("ReduceMean", source, output, opset)
    if spelling == "unsqueeze":
        CONSTANTS["last"] = _const("last", [-1], np.int64)
        return reduce("ReduceMean", source, f"{output}_0", opset, keepdims=0) + [
            node("Unsqueeze", [f"{output}_0", "last"], output)]
    if spelling == "reshape":
        return reduce("ReduceMean", source, f"{output}_0", opset, keepdims=0) + [
            node("Reshape", [f"{output}_0", "kept"], output)]
    if spelling == "sum-div":
        return reduce("ReduceSum", source, f"{output}_0", opset) + [node("Div", [f"{output}_0", "n"], output)]
    assert spelling == "sum-mul"
    return reduce("ReduceSum", source, f"{output}_0", opset) + [node("Mul", [f"{output}_0", "inv_n"], output)]


def _divide(spelling, numerator, root, output):
    if spelling == "div":
        return [node("Div", [numerator, root], output)]
    if spelling == "reciprocal":
        return [node("Reciprocal", [root], "inv"), node("Mul", [numerator, "inv"], output)]
    if spelling == "reciprocal-first":
        return [node("Reciprocal", [root], "inv"), node("Mul", ["inv", numerator], output)]
    if spelling == "one-div":
        return [node("Div", ["one", root], "inv"), node("Mul", [numerator, "inv"], output)]
    assert spelling == "reciprocal-times-one"  # TorchScript's 1.0 / s
    return [node("Reciprocal", [root], "inv0"), node("Mul", ["inv0", "one"], "inv"),
            node("Mul", [numerator, "inv"], output)]


def _affine(spelling, source, output):
    steps = {"scale-bias": [("Mul", "scale"), ("Add", "bias")], "scale": [("Mul", "scale")],
             "bias": [("Add", "bias")], "none": [], "bias-scale-first": [("Mul*", "scale"), ("Add*", "bias")]}[spelling]
    nodes, current = [], source
    for i, (op, param) in enumerate(steps):
        target = output if i == len(steps) - 1 else f"{source}_{i}"
        nodes.append(node(op.rstrip("*"), [param, current] if op.endswith("*") else [current, param], target))
        current = target
    return nodes


def reference_ln(x, scale=SCALE, bias=BIAS, axes=(-1,)):
    d = x - x.mean(axis=axes, keepdims=True)
    return d / np.sqrt((d * d).mean(axis=axes, keepdims=True) + EPS) * scale + bias


def reference_rms(x, scale=SCALE):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + EPS) * scale


def _x(shape=SHAPE, dtype=np.float32):
    return np.random.default_rng(3).standard_normal(shape).astype(dtype)


def fused(m, targets=NormTargets(), opset=None, feeds=None, **kw):
    """fuse_norms on `m`, checked by its own verification and against the original in ORT."""
    feeds = feeds or {"x": _x()}
    result = fuse_norms(m, feeds=feeds, targets=targets, opset=opset, **kw)
    np.testing.assert_allclose(ort_run(result.model, feeds)["y"].astype(np.float32),
                               ort_run(m, feeds)["y"].astype(np.float32), atol=2e-3 if feeds["x"].dtype == np.float16 else 1e-5)
    return result


def statuses(result):
    return [(r.kind, r.status) for r in result.report.records]


def fused_node(result, op="LayerNormalization"):
    return next(n for n in result.model.graph.node if n.op_type == op)


def attribute(n, name):
    return helper.get_attribute_value(next(a for a in n.attribute if a.name == name))


LN_SPELLINGS = {
    "reduce-mean-keepdims": {},
    "keepdims0-unsqueeze": {"mean": "unsqueeze"},
    "keepdims0-reshape": {"mean": "reshape"},
    "reduce-sum-div-n": {"mean": "sum-div"},
    "reduce-sum-mul-inverse-n": {"mean": "sum-mul"},
    "square-as-mul": {"square": "mul"},
    "reciprocal-sqrt-mul": {"divide": "reciprocal"},
    "reciprocal-sqrt-mul-reversed": {"divide": "reciprocal-first"},
    "one-div-sqrt-mul": {"divide": "one-div"},
    "reciprocal-times-one": {"divide": "reciprocal-times-one"},
    "epsilon-first": {"eps_first": True},
    "constants-first-affine": {"affine": "bias-scale-first"},
    "axes-as-input-opset18": {"opset": 18},
    "keepdims0-unsqueeze-opset18": {"mean": "unsqueeze", "opset": 18},
    "reduce-sum-opset13": {"mean": "sum-div", "opset": 13},
}


@pytest.mark.parametrize("spelling", LN_SPELLINGS.values(), ids=LN_SPELLINGS.keys())
def test_each_layer_norm_spelling_becomes_one_node(spelling):
    m = model(layer_norm(**spelling), opset=spelling.get("opset", 17))
    result = fused(m)
    assert statuses(result) == [("LayerNorm", "fused")]
    assert op_types(result.model) == ["LayerNormalization"]
    n = fused_node(result)
    assert attribute(n, "epsilon") == pytest.approx(EPS) and attribute(n, "axis") == -1
    assert result.report.records[0].epsilon == pytest.approx(EPS)
    np.testing.assert_allclose(ort_run(result.model, {"x": _x()})["y"], reference_ln(_x()), atol=1e-5)


def test_an_integer_exponent_squares_too():
    """Issue 29's "integer exponents of any type": Pow(d, int64 2) is read as 2.0 already."""
    CONSTANTS["two_i"] = _const("two_i", 2, np.int64)
    nodes = layer_norm()
    nodes[[n.output[0] for n in nodes].index("sq")].input[1] = "two_i"
    assert op_types(fused(model(nodes)).model) == ["LayerNormalization"]


@pytest.mark.parametrize("affine, inputs", [("none", 2), ("scale", 2), ("bias", 3), ("scale-bias", 3)])
def test_scale_and_bias_are_optional(affine, inputs):
    result = fused(model(layer_norm(affine=affine)))
    assert op_types(result.model) == ["LayerNormalization"] and len(fused_node(result).input) == inputs


def test_opset_13_is_raised_to_17_for_layer_normalization():
    result = fused(model(layer_norm(), opset=13))
    assert (result.report.opset_before, result.report.opset_after) == (13, 17)
    assert result.model.opset_import[0].version == 17 and op_types(result.model) == ["LayerNormalization"]


def test_torchscript_var_mean_two_equal_means_are_one_layer_norm():
    """One mean centers the numerator, an equal second one the variance's input."""
    nodes = reduce("ReduceMean", "x", "mean") + reduce("ReduceMean", "x", "mean2") + [
        node("Sub", ["x", "mean2"], "d2"), node("Mul", ["d2", "d2"], "sq"), *reduce("ReduceMean", "sq", "var"),
        node("Sub", ["x", "mean"], "d"), node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std"),
        node("Div", ["d", "std"], "normed"), node("Mul", ["normed", "scale"], "y")]
    result = fused(model(nodes))
    assert statuses(result) == [("LayerNorm", "fused")] and op_types(result.model) == ["LayerNormalization"]


def test_dynamos_var_mean_keepdims0_reshape_expand_and_no_epsilon():
    """dynamo's var_mean + rsqrt: the sum of x with its dims dropped, restored by Reshape + Expand,
    then divided by N; the variance restored the same way; no epsilon."""
    def restored(op, source, output):
        return reduce(op, source, f"{output}_0", opset=18, keepdims=0) + [
            node("Reshape", [f"{output}_0", "kept"], f"{output}_1"), node("Expand", [f"{output}_1", "kept"], output)]
    nodes = reduce("ReduceMean", "x", "mean_v", opset=18) + [
        node("Sub", ["x", "mean_v"], "d_v"), node("Mul", ["d_v", "d_v"], "sq"), *restored("ReduceMean", "sq", "var"),
        *restored("ReduceSum", "x", "total"), node("Div", ["total", "n"], "mean"), node("Sub", ["x", "mean"], "d"),
        node("Sqrt", ["var"], "std"), node("Reciprocal", ["std"], "inv"), node("Mul", ["d", "inv"], "y")]
    result = fused(model(nodes, opset=18, shape=("batch", "seq", 8)))  # dims dynamo leaves symbolic
    assert statuses(result) == [("LayerNorm", "fused")] and op_types(result.model) == ["LayerNormalization"]
    assert result.report.records[0].epsilon == 0.0


def test_channels_first_axes_are_moved_last_with_transposes():
    CONSTANTS["scale_c"] = _const("scale_c", SCALE.reshape(8, 1, 1))
    nodes = reduce("ReduceMean", "x", "mean", axes=(1,)) + [
        node("Sub", ["x", "mean"], "d"), node("Pow", ["d", "two"], "sq"), *reduce("ReduceMean", "sq", "var", axes=(1,)),
        node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std"), node("Div", ["d", "std"], "normed"),
        node("Mul", ["normed", "scale_c"], "y")]
    x = _x((2, 8, 3, 3))
    result = fused(model(nodes, shape=(2, 8, 3, 3)), feeds={"x": x})
    assert op_types(result.model) == ["Transpose", "LayerNormalization", "Transpose"]
    assert "moved last with Transpose [0, 2, 3, 1]" in result.report.records[0].notes[0]


def test_two_trailing_axes_become_axis_minus_two():
    CONSTANTS["scale_2d"] = _const("scale_2d", np.ones((3, 8)))
    nodes = reduce("ReduceMean", "x", "mean", axes=(-2, -1)) + [
        node("Sub", ["x", "mean"], "d"), node("Mul", ["d", "d"], "sq"), *reduce("ReduceMean", "sq", "var", axes=(1, 2)),
        node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std"), node("Div", ["d", "std"], "normed"),
        node("Mul", ["normed", "scale_2d"], "y")]
    result = fused(model(nodes))
    assert op_types(result.model) == ["LayerNormalization"] and attribute(fused_node(result), "axis") == -2


def test_fp16_cast_island_is_absorbed_into_one_fp16_node():
    nodes = [node("Cast", ["x"], "x32", to=TensorProto.FLOAT), *layer_norm(source="x32", out="y32", affine="none"),
             node("Cast", ["y32"], "y", to=TensorProto.FLOAT16)]
    result = fused(model(nodes, dtype=TensorProto.FLOAT16), feeds={"x": _x(dtype=np.float16)})
    assert op_types(result.model) == ["LayerNormalization"]
    assert attribute(fused_node(result), "stash_type") == 1
    assert "Cast pair absorbed" in " ".join(result.report.records[0].notes)


def test_scope_metadata_is_kept_on_the_fused_node():
    nodes = layer_norm()
    for n in nodes:
        set_scope(n, "encoder.layers.0.norm")
    result = fused(model(nodes))
    assert get_scope(fused_node(result)) == "encoder.layers.0.norm"
    assert result.report.records[0].scope == "encoder.layers.0.norm"


def test_a_constant_that_is_no_per_feature_scale_stays_outside():
    CONSTANTS["per_token"] = _const("per_token", RNG.standard_normal((3, 1)))
    nodes = layer_norm(affine="none", out="normed2") + [node("Mul", ["normed2", "per_token"], "y")]
    result = fused(model(nodes))
    assert op_types(result.model) == ["LayerNormalization", "Mul"]


def test_a_norm_inside_a_local_function_is_fused_after_inlining():
    body = layer_norm(source="fx", out="fy")
    function = helper.make_function("local", "LN", ["fx", "scale", "bias", "eps", "two"], ["fy"], body,
                                    [helper.make_opsetid("", 17)])
    m = model([node("LN", ["x", "scale", "bias", "eps", "two"], "y", domain="local")])
    m.graph.initializer.extend([CONSTANTS[n] for n in ("scale", "bias", "eps", "two")])
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.functions.append(function)
    result = fused(m)
    assert statuses(result) == [("LayerNorm", "fused")] and result.report.inlined == {"local::LN": 1}


def test_a_norm_inside_a_loop_body_is_fused():
    ln = layer_norm(source="x", out="ln_out")
    body = helper.make_graph(ln + [node("Identity", ["cond_in"], "cond_out")], "loop_body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("ln_out", TensorProto.FLOAT, None)])
    CONSTANTS["trips"] = _const("trips", 2, np.int64)
    CONSTANTS["cond"] = _const("cond", True, np.bool_)
    CONSTANTS["axis0"] = _const("axis0", [0], np.int64)
    loop = node("Loop", ["trips", "cond"], "stacked", body=body)
    m = model([loop, node("ReduceSum", ["stacked", "axis0"], "y", keepdims=0)])
    m.graph.initializer.extend([CONSTANTS[n] for n in ("scale", "bias", "eps", "two", "trips", "cond", "axis0")])
    result = fused(m)
    assert statuses(result) == [("LayerNorm", "fused")] and "inside Loop" in result.report.records[0].notes[-1]
    inner = helper.get_attribute_value(result.model.graph.node[0].attribute[0])
    assert [n.op_type for n in inner.node] == ["LayerNormalization", "Identity"]


# RMSNorm ----------------------------------------------------------------------------------------

def rms_norm(square="mul", divide="div", scale=True, source="x", out="y", mean="keepdims"):
    nodes = [node("Mul", [source, source], "sq")] if square == "mul" else [node("Pow", [source, "two"], "sq")]
    nodes += _mean(mean, "sq", "var", 17) + [node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std")]
    nodes += _divide(divide, source, "std", "normed" if scale else out)
    return nodes + ([node("Mul", ["normed", "scale"], out)] if scale else [])


RMS_SPELLINGS = {
    "t5-mul-div": {},
    "pow-reciprocal-mul": {"square": "pow", "divide": "reciprocal"},
    "one-div-sqrt": {"divide": "one-div"},
    "no-scale": {"scale": False},
    "reduce-sum-div-n": {"mean": "sum-div"},
}


@pytest.mark.parametrize("spelling", RMS_SPELLINGS.values(), ids=RMS_SPELLINGS.keys())
def test_each_rms_norm_spelling_becomes_one_node(spelling):
    result = fused(model(rms_norm(**spelling)))
    assert statuses(result) == [("RMSNorm", "fused")]
    assert op_types(result.model) == ["SimplifiedLayerNormalization"]
    expected = reference_rms(_x(), SCALE if spelling.get("scale", True) else 1.0)
    np.testing.assert_allclose(ort_run(result.model, {"x": _x()})["y"], expected, atol=1e-5)


def test_rms_norm_at_opset_23_is_onnxs_rms_normalization():
    result = fused(model(rms_norm()), opset=23)
    assert op_types(result.model) == ["RMSNormalization"] and result.report.opset_after == 23


def test_rms_norm_targets_ort_and_onnx():
    assert op_types(fused(model(rms_norm()), targets=NormTargets(rms="ort")).model) == ["SimplifiedLayerNormalization"]
    left = fused(model(rms_norm()), targets=NormTargets(rms="onnx"))
    assert statuses(left) == [("RMSNorm", "left")] and "needs opset 23" in left.report.records[0].reason


def test_llama_rms_norm_with_its_fp32_cast_island():
    """HF LlamaRMSNorm: fp16 in, computed in fp32, cast back, then weight * hidden."""
    CONSTANTS["scale16"] = _const("scale16", SCALE, np.float16)
    nodes = [node("Cast", ["x"], "x32", to=TensorProto.FLOAT), *rms_norm("pow", "reciprocal", False, "x32", "n32"),
             node("Cast", ["n32"], "n16", to=TensorProto.FLOAT16), node("Mul", ["scale16", "n16"], "y")]
    result = fused(model(nodes, dtype=TensorProto.FLOAT16), feeds={"x": _x(dtype=np.float16)})
    assert op_types(result.model) == ["SimplifiedLayerNormalization"]
    assert "Cast pair absorbed" in " ".join(result.report.records[0].notes)


def test_gemma_one_plus_weight_fuses_the_norm_and_keeps_the_computed_scale_outside():
    nodes = rms_norm(scale=False, out="normed") + [node("Add", ["one", "scale"], "w1"), node("Mul", ["normed", "w1"], "y")]
    result = fused(model(nodes))
    assert statuses(result) == [("RMSNorm", "fused")]
    assert sorted(op_types(result.model)) == ["Add", "Mul", "SimplifiedLayerNormalization"]


def test_a_layer_norm_tail_is_not_also_reported_as_an_rms_norm():
    assert statuses(fused(model(layer_norm()))) == [("LayerNorm", "fused")]


# Refusals --------------------------------------------------------------------------------------

def refused(m, feeds=None):
    feeds = feeds or {"x": _x()}
    result = fuse_norms(m, feeds=feeds)
    assert op_types(result.model) == op_types(m)
    return [(r.kind, r.status, r.reason) for r in result.report.records]


def different_axes(source="x", out="y"):
    """A LayerNorm look-alike: the mean over axis 1, the variance over axis 2."""
    return reduce("ReduceMean", source, "mean", axes=(1,)) + [
        node("Sub", [source, "mean"], "d"), node("Mul", ["d", "d"], "sq"),
        *reduce("ReduceMean", "sq", "var", axes=(2,)), node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std"),
        node("Div", ["d", "std"], out)]


def test_mean_and_variance_over_different_axes_are_refused():
    assert refused(model(different_axes())) == [
        ("LayerNorm", "refused", "the mean is over axes [1] but the variance over [2]")]


def test_dynamos_unbiased_variance_is_refused():
    """torch.var(unbiased=True): the sum of squares divided by N-1."""
    nodes = layer_norm(mean="sum-div")
    CONSTANTS["n_1"] = _const("n_1", 7.0)
    nodes[[n.output[0] for n in nodes].index("var")].input[1] = "n_1"
    assert refused(model(nodes)) == [
        ("LayerNorm", "refused", "the sum is divided by N-1 = 7 (unbiased variance), not N = 8")]


def test_a_variance_rescaled_before_epsilon_is_refused():
    CONSTANTS["bessel"] = _const("bessel", 8 / 7)
    nodes = layer_norm()
    at = [n.output[0] for n in nodes].index("var")
    nodes[at + 1:at + 1] = [node("Mul", ["var", "bessel"], "var_u")]
    nodes[at + 2].input[:] = ["var_u", "eps"]
    assert refused(model(nodes)) == [("LayerNorm", "refused", "the variance is rescaled by Mul 1.14286 before "
                                      "epsilon (unbiased N-1 variance is not LayerNorm)")]


def test_a_dropped_dims_reduction_rescaled_is_refused():
    """dynamo's unbiased variance: ReduceMean(keepdims=0) times N/(N-1) before the dims come back."""
    CONSTANTS["bessel"] = _const("bessel", 8 / 7)
    nodes = layer_norm(mean="unsqueeze")
    at = [n.output[0] for n in nodes].index("var_0")
    nodes[at + 1:at + 1] = [node("Mul", ["var_0", "bessel"], "var_u")]
    nodes[at + 2].input[0] = "var_u"
    assert refused(model(nodes)) == [("LayerNorm", "refused", "the reduction is rescaled by Mul 1.14286 "
                                      "(unbiased N-1 variance is not LayerNorm)")]


def test_non_constant_reduction_axes_are_refused():
    axes = helper.make_tensor_value_info("axes_in", TensorProto.INT64, [1])
    nodes = reduce("ReduceMean", "x", "mean", opset=18) + [
        node("Sub", ["x", "mean"], "d"), node("Mul", ["d", "d"], "sq"), node("ReduceMean", ["sq", "axes_in"], "var"),
        node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std"), node("Div", ["d", "std"], "y")]
    feeds = {"x": _x(), "axes_in": np.array([-1], np.int64)}
    assert refused(model(nodes, opset=18, inputs=[axes]), feeds) == [
        ("LayerNorm", "refused", "the reduction axes are not constant")]


def test_epsilon_outside_the_square_root_is_refused():
    nodes = reduce("ReduceMean", "x", "mean") + [
        node("Sub", ["x", "mean"], "d"), node("Mul", ["d", "d"], "sq"), *reduce("ReduceMean", "sq", "var"),
        node("Sqrt", ["var"], "std"), node("Add", ["std", "eps"], "se"), node("Div", ["d", "se"], "y")]
    assert refused(model(nodes)) == [("LayerNorm", "refused", "epsilon is added outside the square root")]


def _epsilon_fed(nodes):
    """The norm of `nodes` with its epsilon a graph input, and the feeds for it."""
    nodes[[n.output[0] for n in nodes].index("ve")].input[:] = ["var", "eps_in"]
    eps = helper.make_tensor_value_info("eps_in", TensorProto.FLOAT, [])
    return model(nodes, inputs=[eps]), {"x": _x(), "eps_in": np.array(EPS, np.float32)}


@pytest.mark.parametrize("kind, nodes", [("LayerNorm", layer_norm), ("RMSNorm", rms_norm)])
def test_a_non_constant_epsilon_is_refused(kind, nodes):
    assert refused(*_epsilon_fed(nodes())) == [(kind, "refused", "epsilon is not a constant")]


def test_an_epsilon_that_is_no_scalar_is_refused():
    CONSTANTS["eps_row"] = _const("eps_row", np.full((1, 1, 1, 1), EPS))
    nodes = layer_norm()
    nodes[[n.output[0] for n in nodes].index("ve")].input[:] = ["var", "eps_row"]
    assert refused(model(nodes)) == [
        ("LayerNorm", "refused", "epsilon has shape [1, 1, 1, 1], not a scalar that keeps the variance's shape")]


def test_an_intermediate_that_is_a_graph_output_is_refused():
    reasons = refused(model(layer_norm(), extra_outputs=("d",)))
    assert [r[:2] for r in reasons] == [("LayerNorm", "refused")]
    assert reasons[0][2] == "the intermediate 'd' escapes (a graph output, or read inside a subgraph)"


def test_an_intermediate_read_outside_the_norm_is_refused():
    nodes = layer_norm(out="z") + [node("Add", ["z", "std"], "y")]
    (reason,) = [r[2] for r in refused(model(nodes))]
    assert reason.startswith("the intermediate 'std' is also read by Add") and reason.endswith("outside the LayerNorm")


def test_a_centered_input_without_a_variance_is_refused():
    nodes = reduce("ReduceMean", "x", "mean") + [node("Sub", ["x", "mean"], "y")]
    assert refused(model(nodes)) == [
        ("LayerNorm", "refused", "no variance: nothing averages the square of x - mean(x)")]


def test_a_mean_of_squares_that_divides_nothing_is_no_candidate():
    nodes = [node("Mul", ["x", "x"], "sq"), *reduce("ReduceMean", "sq", "y")]
    assert refused(model(nodes)) == []


def test_a_norm_of_a_tensor_of_unknown_type_is_refused():
    """A custom op's output whose element type nothing gives: no scale or bias could be typed for it."""
    nodes = [helper.make_node("Foo", ["x"], ["t"], domain="custom", name="/Foo_t"), *layer_norm(source="t")]
    m = model(nodes)
    m.opset_import.append(helper.make_opsetid("custom", 1))
    kept = (*SHAPE[:-1], 1)
    m.graph.value_info.extend(helper.make_tensor_value_info(name, TensorProto.UNDEFINED, shape) for name, shape in
                              [("t", SHAPE), ("mean", kept), ("d", SHAPE), ("sq", SHAPE), ("var", kept)])
    assert refused(m) == [("LayerNorm", "refused", "the element type of 't' is unknown, so scale and bias cannot be "
                           "built")]


def test_the_callers_model_is_left_as_it_was():
    m = model(layer_norm())
    before = m.SerializeToString()
    fused(m)
    assert m.SerializeToString() == before and isinstance(m, onnx.ModelProto)
