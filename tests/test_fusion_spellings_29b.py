"""Issue 29's remaining shapes, each on a small hand-built graph fused and checked in ONNX Runtime
like those of test_fusion_spellings: Casts inside a mixed-precision LayerNorm, normalized dims
shape inference cannot give, integer exponents ONNX Runtime has no kernel for."""

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

import norm_modules as nm
from conftest import export, op_types, ort_run
from test_fusion_spellings_29 import keras_layer_norm
from test_fusion_spellings import (BIAS, CONSTANTS, SCALE, _const, _divide, _x, attribute, fused, fused_node,
                                   layer_norm, model, node, reduce, reference_ln, reference_rms, refused, rms_norm,
                                   statuses)
from ticknorm.base.errors import OnnxFileError
from ticknorm.exporter.fusion import find_norms, fuse_norms, typed_ir
from ticknorm.exporter.fusion.norms import NormMatch
from ticknorm.exporter.fusion.verify import Checked, verify_fused

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


class MixedLayerNorm(torch.nn.Module):
    """The mixed-precision LayerNorm of hand-written fp16 models: the variance and the division in
    fp32; `lift_mean`: the mean too, of x Cast up, Cast back."""

    def __init__(self, lift_mean):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(SCALE16))
        self.bias = torch.nn.Parameter(torch.from_numpy(BIAS16))
        self.lift_mean = lift_mean

    def forward(self, x):
        mean = x.float().mean(-1, keepdim=True).to(x.dtype) if self.lift_mean else x.mean(-1, keepdim=True)
        centered = (x - mean).float()
        normed = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.weight * normed.to(x.dtype) + self.bias


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("lift_mean", [False, True], ids=["fp16-mean", "mean-of-x-cast-up"])
def test_an_exported_mixed_precision_layer_norm_is_one_fp16_node(exporter, lift_mean):
    x = np.random.default_rng(0).standard_normal((2, 6, 8)).astype(np.float16)
    result = fuse_norms(export(MixedLayerNorm(lift_mean), {"x": x}, exporter), feeds={"x": x})
    assert op_types(result.model) == ["LayerNormalization"] and result.report.verified
    np.testing.assert_allclose(ort_run(result.model, {"x": x})[result.model.graph.output[0].name].astype(np.float32),
                               _fp16_reference(x).astype(np.float32), atol=1e-2)


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
    assert ("the original in onnx's reference evaluator" in result.report.summary()) == (dtype != np.int32)
    np.testing.assert_allclose(ort_run(result.model, {"x": _x()})["y"], reference_ln(_x()), atol=1e-5)


def test_an_original_that_neither_runtime_can_run_is_one_clear_error():
    """The int8 Pow outside any norm: the fused graph still holds it, so ONNX Runtime cannot run it."""
    CONSTANTS["two_int8"] = _const("two_int8", 2, np.int8)
    nodes = [*layer_norm(out="y0"), node("Pow", ["y0", "two_int8"], "y")]
    with pytest.raises(OnnxFileError, match="NOT_IMPLEMENTED"):
        fuse_norms(model(nodes), feeds={"x": _x()})


def _fed(name, dims, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, dims)


def test_plain_length_c_scale_and_bias_fuse_when_the_rank_is_unknown():
    """Paddle2ONNX: the input's shape is unknown to shape inference, the scale and bias are plain
    length-C initializers: they are the normalized dims."""
    m = model(layer_norm())
    m.graph.input[0].type.tensor_type.ClearField("shape")
    result = fused(m)
    assert statuses(result) == [("LayerNorm", "fused")] and op_types(result.model) == ["LayerNormalization"]
    assert len(fused_node(result).input) == 3
    np.testing.assert_allclose(ort_run(result.model, {"x": _x()})["y"], reference_ln(_x()), atol=1e-5)


def test_a_scale_and_bias_fed_as_graph_inputs_are_read_by_the_fused_node():
    nodes = layer_norm()
    for n in nodes:
        n.input[:] = [{"scale": "gamma", "bias": "beta"}.get(i, i) for i in n.input]
    m = model(nodes, shape=("batch", "seq", "hidden"), inputs=[_fed("gamma", ["hidden"]), _fed("beta", ["hidden"])])
    feeds = {"x": _x(), "gamma": SCALE, "beta": BIAS}
    result = fused(m, feeds=feeds)
    assert op_types(result.model) == ["LayerNormalization"] and list(fused_node(result).input) == ["x", "gamma", "beta"]
    assert not result.model.graph.initializer or "gamma" not in [t.name for t in result.model.graph.initializer]
    np.testing.assert_allclose(ort_run(result.model, feeds)["y"], reference_ln(_x()), atol=1e-5)


def test_a_fed_scale_of_other_dims_stays_its_own_mul():
    nodes = layer_norm(affine="scale")
    nodes[-1].input[1] = "gamma"
    m = model(nodes, shape=("batch", "seq", "hidden"), inputs=[_fed("gamma", [1])])
    feeds = {"x": _x(), "gamma": np.full(1, 2.0, np.float32)}
    result = fused(m, feeds=feeds)
    assert op_types(result.model) == ["Shape", "ConstantOfShape", "LayerNormalization", "Mul"]


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_no_scale_over_unknown_dims_is_a_scale_of_ones_from_the_input_shape(kind):
    nodes = layer_norm(affine="none") if kind == "LayerNorm" else rms_norm(scale=False)
    result = fused(model(nodes, shape=("batch", "seq", "hidden")))
    op = "LayerNormalization" if kind == "LayerNorm" else "SimplifiedLayerNormalization"
    assert op_types(result.model) == ["Shape", "ConstantOfShape", op]
    shape = next(n for n in result.model.graph.node if n.op_type == "Shape")
    assert attribute(shape, "start") == -1
    for x in (_x(), _x((1, 5, 16))):  # any hidden size
        expected = reference_ln(x, 1.0, 0.0) if kind == "LayerNorm" else reference_rms(x, 1.0)
        np.testing.assert_allclose(ort_run(result.model, {"x": x})["y"], expected, atol=1e-5)


def test_unknown_dims_below_opset_15_are_refused_for_an_rms_norm():
    m = model(rms_norm(scale=False), opset=13, shape=("batch", "seq", "hidden"))
    assert refused(m) == [("RMSNorm", "refused", "the normalized dims of 'x' are not static, and opset 13 has no "
                                                 "Shape(start) to build the scale of ones from (fuse with --opset 15 "
                                                 "or above)")]


def _behind_contrib_gelu(nodes):
    """`x` through ONNX Runtime's com.microsoft Gelu first: ONNX's shape inference knows nothing
    of what comes out of it, ONNX Runtime's symbolic one does."""
    for n in nodes:
        n.input[:] = ["h" if i == "x" else i for i in n.input]
    m = model([helper.make_node("Gelu", ["x"], ["h"], name="/Gelu", domain="com.microsoft"), *nodes])
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


def test_symbolic_shape_inference_gives_the_rank_onnx_could_not():
    """Channels-first axes need the rank to be moved last: only symbolic inference has it here."""
    CONSTANTS["scale_c"] = _const("scale_c", SCALE[:3].reshape(3, 1))
    nodes = [*reduce("ReduceMean", "x", "mean", axes=(1,)), node("Sub", ["x", "mean"], "d"),
             node("Pow", ["d", "two"], "sq"), *reduce("ReduceMean", "sq", "var", axes=(1,)),
             node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std"), node("Div", ["d", "std"], "normed"),
             node("Mul", ["normed", "scale_c"], "y")]
    result = fused(_behind_contrib_gelu(nodes))
    assert op_types(result.model) == ["Gelu", "Transpose", "LayerNormalization", "Transpose"]


def test_symbolic_shape_inference_runs_only_when_onnxs_left_a_needed_dim_unknown():
    typed = typed_ir(model(layer_norm()))
    assert isinstance(find_norms(typed.graph)[0], NormMatch) and not typed.graph.meta["symbolic"].ran
    typed = typed_ir(_behind_contrib_gelu(layer_norm()))
    assert isinstance(find_norms(typed.graph)[0], NormMatch) and typed.graph.meta["symbolic"].ran


def _in_a_loop(body_nodes):
    """`x` normalized inside a Loop body (twice, stacked, summed): the body reads x, scale, bias,
    eps, two from the main graph."""
    body = helper.make_graph(body_nodes + [node("Identity", ["cond_in"], "cond_out")], "loop_body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("ln_out", TensorProto.FLOAT, None)])
    CONSTANTS.update(trips=_const("trips", 2, np.int64), cond=_const("cond", True, np.bool_),
                     axis0=_const("axis0", [0], np.int64))
    m = model([node("Loop", ["trips", "cond"], "stacked", body=body),
               node("ReduceSum", ["stacked", "axis0"], "y", keepdims=0)])
    m.graph.initializer.extend([CONSTANTS[n] for n in ("scale", "bias", "eps", "two", "trips", "cond", "axis0")])
    return m


def test_a_norm_fused_inside_a_loop_body_is_checked_on_edge_rows():
    """Epsilon 0 agrees with the original on seeded rows and gives NaN on an all-zero row, where
    the original gives the bias: caught inside the body too."""
    original = _in_a_loop(layer_norm(out="ln_out"))
    result = fuse_norms(original, feeds={"x": _x()})
    assert result.report.verified and [r.input for r in result.report.records] == ["x"]
    broken = _in_a_loop([node("LayerNormalization", ["x", "scale", "bias"], "ln_out", epsilon=0.0)])
    checks = verify_fused(original, broken, Checked({}, inner={"ln_out": "x"}), {"x": _x()}).checks
    assert checks["ln_out"].reason.startswith("changes the numbers on an all-zero row")


def test_a_fed_scale_after_a_folded_offset_stays_its_own_mul():
    """TF/Keras's folded form composes constant scales only: the fed one stays outside, the norm fuses."""
    nodes = keras_layer_norm()
    nodes[-1] = node("Add", ["xg", "off"], "y0")
    m = model([*nodes, node("Mul", ["y0", "gamma"], "y")], shape=("batch", "seq", "hidden"),
              inputs=[_fed("gamma", ["hidden"])])
    feeds = {"x": _x(), "gamma": SCALE}
    result = fused(m, feeds=feeds)
    assert op_types(result.model) == ["LayerNormalization", "Mul"]


class HalfT5RMSNorm(torch.nn.Module):
    """T5's RMSNorm in fp16: the variance of x Cast up, x * rsqrt(variance) back in fp16
    (TorchScript Casts the inverse down), then the fp16 weight."""

    def __init__(self):
        super().__init__()
        self.norm = nm.T5RMSNorm(8).half()

    def forward(self, x):
        return self.norm(x)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_an_fp16_t5_rms_norm_is_one_fp16_node(exporter):
    x = np.random.default_rng(0).standard_normal((2, 6, 8)).astype(np.float16)
    module = HalfT5RMSNorm()
    result = fuse_norms(export(module, {"x": x}, exporter), feeds={"x": x})
    assert op_types(result.model) == ["SimplifiedLayerNormalization"] and result.report.verified
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).float().numpy()
    np.testing.assert_allclose(ort_run(result.model, {"x": x})[result.model.graph.output[0].name].astype(np.float32),
                               expected, atol=1e-2)


def test_an_rms_norm_whose_fp32_inverse_is_cast_down_is_one_fp16_node():
    """x * Cast(1/sqrt(mean(Cast(x)^2) + eps), fp16): the variance in fp32, the product in fp16."""
    nodes = [node("Cast", ["x"], "x32", to=TensorProto.FLOAT), node("Pow", ["x32", "two"], "sq"),
             *reduce("ReduceMean", "sq", "var"), node("Add", ["var", "eps"], "ve"), node("Sqrt", ["ve"], "std"),
             node("Reciprocal", ["std"], "inv32"), node("Cast", ["inv32"], "inv", to=TensorProto.FLOAT16),
             node("Mul", ["x", "inv"], "y")]
    feeds = {"x": _x(dtype=np.float16)}
    result = fused(model(nodes, dtype=TensorProto.FLOAT16), feeds=feeds)
    assert op_types(result.model) == ["SimplifiedLayerNormalization"] and fused_node(
        result, "SimplifiedLayerNormalization").input[0] == "x"
    np.testing.assert_allclose(ort_run(result.model, feeds)["y"].astype(np.float32),
                               reference_rms(feeds["x"].astype(np.float32), 1.0), atol=1e-2)
