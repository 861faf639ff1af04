"""`--ln-target plugin`: the graph TensorRT's ONNX parser turns into our plugin, checked without
TensorRT: valid ONNX, the attributes the parser reads, the same numbers (the plugin op evaluated by
ONNX's reference evaluator), the module scopes kept, and the nodes it must leave alone."""

import importlib.util
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

import norm_modules as nm
from conftest import export, ort_outputs
from test_cli import EXAMPLE_ARGS, run
from ticknorm.exporter.fusion import fuse_norms
from ticknorm.exporter.plugin_target import to_plugin_target
from ticknorm.base.scopes import get_scope
from ticknorm.plugins import PLUGIN_NAME, PLUGIN_NAMESPACE, plugin_nodes
from ticknorm.plugins.launch import MAX_HIDDEN

torch = pytest.importorskip("torch")


class LayerNorm(OpRun):
    """The plugin's contract, in numpy: normalize over the dims from `axis` on, fp32 statistics."""

    op_domain = PLUGIN_NAMESPACE

    def _run(self, x, scale, bias, epsilon=None, axis=None, plugin_namespace=None, plugin_version=None):
        axes = tuple(range(axis % x.ndim, x.ndim))
        wide = x.astype(np.float32)
        centered = wide - wide.mean(axis=axes, keepdims=True)
        normalized = centered / np.sqrt((centered * centered).mean(axis=axes, keepdims=True) + epsilon)
        return ((normalized * scale + bias).astype(x.dtype),)


class FourNorms(torch.nn.Module):
    """LayerNorms written four ways, one of them without bias."""

    def __init__(self):
        super().__init__()
        self.norms = torch.nn.ModuleList([nm.PowSqrtDiv(), nm.MulRsqrt(), torch.nn.LayerNorm(16, bias=False),
                                          torch.nn.LayerNorm(16, eps=1e-3)])

    def forward(self, x):
        for norm in self.norms:
            x = norm(x) * 2 + 1
        return x


@pytest.fixture(scope="module")
def fused_pair():
    module = FourNorms()
    feeds = {"x": (np.random.default_rng(7).standard_normal((2, 5, 16)) * 3 + 7).astype(np.float32)}
    native = fuse_norms(export(module, feeds, "dynamo"), feeds=feeds).model
    return native, to_plugin_target(native), feeds


def test_plugin_graph_is_valid_onnx_with_the_parser_attributes(fused_pair):
    native, result, _ = fused_pair
    onnx.checker.check_model(result.model, full_check=True)
    natives = [n for n in native.graph.node if n.op_type == "LayerNormalization"]
    plugins = [n for n in result.model.graph.node if n.domain == PLUGIN_NAMESPACE]
    assert len(natives) == 4 and [n.name for n in plugins] == [n.name for n in natives] == result.converted
    assert not [n for n in result.model.graph.node if n.op_type == "LayerNormalization"] and not result.kept
    assert helper.make_opsetid(PLUGIN_NAMESPACE, 1) in result.model.opset_import
    initializers = {t.name: t for t in result.model.graph.initializer}
    for before, after in zip(natives, plugins):
        attributes = {a.name: helper.get_attribute_value(a) for a in after.attribute}
        assert after.op_type == PLUGIN_NAME
        assert attributes["plugin_namespace"] == b"ticknorm" and attributes["plugin_version"] == b"1"
        assert attributes["axis"] == -1
        eps = {a.name: helper.get_attribute_value(a) for a in before.attribute}.get("epsilon", 1e-5)
        assert attributes["epsilon"] == pytest.approx(eps)
        assert len(after.input) == 3 and tuple(initializers[after.input[2]].dims) == (16,)
        assert get_scope(after) == get_scope(before) is not None
    assert sum(1 for p in plugins if initializers[p.input[2]].name.endswith("zero_bias")) == 1


def test_plugin_graph_computes_what_the_native_graph_computes(fused_pair):
    native, result, feeds = fused_pair
    plugin_out = ReferenceEvaluator(result.model, new_ops=[LayerNorm]).run(None, feeds)[0]
    np.testing.assert_allclose(plugin_out, ort_outputs(native, feeds)[0], atol=2e-5, rtol=1e-5)


def _one_ln_graph(x_type=TensorProto.FLOAT, hidden=8, scale_as_input=False, mean_output=False, axis=-1,
                  scale_dims=None):
    x = helper.make_tensor_value_info("x", x_type, ["b", 4, hidden])
    y = helper.make_tensor_value_info("y", x_type, ["b", 4, hidden])
    outputs, graph_outputs = ["y"], [y]
    if mean_output:
        outputs.append("mean")
        graph_outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["b", 4, 1]))
    scale_dtype = helper.tensor_dtype_to_np_dtype(x_type)
    inputs, initializers = [x], [numpy_helper.from_array(np.ones(scale_dims or hidden, scale_dtype), "s")]
    if scale_as_input:
        inputs, initializers = [x, helper.make_tensor_value_info("s", x_type, ["h"])], []
    node = helper.make_node("LayerNormalization", ["x", "s"], outputs, "ln", axis=axis)
    graph = helper.make_graph([node], "g", inputs, graph_outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("graph, reason", [
    (_one_ln_graph(mean_output=True), "Mean/InvStdDev outputs are used"),
    (_one_ln_graph(TensorProto.DOUBLE), "input dtype is DOUBLE"),
    (_one_ln_graph(scale_as_input=True), "shape of its scale is not known"),
    (_one_ln_graph(hidden=MAX_HIDDEN + 1), f"at most {MAX_HIDDEN}"),
    (_one_ln_graph(axis=-2), "not of the normalized shape (4, 8); the plugin does not broadcast them"),
], ids=["mean-output", "double", "dynamic-scale", "too-long", "broadcast-scale"])
def test_nodes_the_plugin_cannot_compute_stay_native_with_the_reason(graph, reason):
    result = to_plugin_target(graph)
    assert result.converted == [] and reason in result.kept["ln"]
    assert result.model is graph and "kept ln: " in result.summary()


def test_two_trailing_axes_take_a_zero_bias_of_the_normalized_shape():
    result = to_plugin_target(_one_ln_graph(axis=-2, scale_dims=(4, 8)))
    assert result.converted == ["ln"]
    (node,) = result.model.graph.node
    zero_bias = next(t for t in result.model.graph.initializer if t.name == node.input[2])
    assert tuple(zero_bias.dims) == (4, 8) and not numpy_helper.to_array(zero_bias).any()
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["axis"] == -2


def test_cli_fuse_to_plugin_then_ort_refuses_in_one_line(tmp_path):
    native = tmp_path / "native.onnx"
    assert run("export", *EXAMPLE_ARGS, "-o", native, "--no-check").exit_code == 0
    out = tmp_path / "plugin.onnx"
    result = run("fuse", native, "-o", out, "--ln-target", "plugin")
    assert result.exit_code == 0, result.output
    assert "5 LayerNormalization node(s) now ticknorm::LayerNorm (TensorRT plugin), 0 kept" in result.output
    inspected = run("inspect", out)
    assert re.search(r"\n  ticknorm::LayerNorm +5\n", inspected.output) and "5 fused, 0 decomposed" in inspected.output
    assert len(plugin_nodes(onnx.load(str(out)))) == 5
    refused = run("compare", out, *EXAMPLE_ARGS)
    assert refused.exit_code == 2
    error = refused.stderr.strip().splitlines()[-1]  # after the progress lines
    assert error.startswith("error: ort-cpu: the graph holds 5 TensorRT plugin node(s)")
    assert error.endswith("--ln-target native for it") and "Traceback" not in refused.output


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_trt_engine_with_the_plugin_matches_ort_native(fused_pair):
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        pytest.skip("needs TensorRT 10.9+ and a CUDA GPU (neither is on this machine)")
    from ticknorm.runtime.registry import RunnerSetup, make_runner
    from ticknorm.runtime.trt_runner import profile_for

    native, result, feeds = fused_pair
    with make_runner("trt", result.model, RunnerSetup(profile=profile_for(result.model, feeds))) as runner:
        trt = runner.infer(feeds)
    np.testing.assert_allclose(next(iter(trt.outputs.values())), ort_outputs(native, feeds)[0], atol=1e-4, rtol=1e-4)


class _DataType:
    """What `trt.DataType.HALF` and friends look like from Python: an enum member with a name."""

    def __init__(self, name):
        self.name = name


def test_plugin_launch_arithmetic_without_tensorrt():
    from ticknorm.base.errors import TicknormError
    from ticknorm.plugins.trt_plugin import kernel_dtype, launch_grid, product, split_at_axis

    assert [kernel_dtype(_DataType(n)) for n in ("FLOAT", "HALF", "BF16")] == ["fp32", "fp16", "bf16"]
    with pytest.raises(TicknormError, match="not INT8"):
        kernel_dtype(_DataType("INT8"))
    assert split_at_axis(["b", "s", 768], -1) == (["b", "s"], [768])
    assert split_at_axis(["b", 4, 8], 1) == (["b"], [4, 8]) == split_at_axis(["b", 4, 8], -2)
    with pytest.raises(TicknormError, match="axis 3 is out of range for a rank-3 input"):
        split_at_axis([2, 4, 8], 3)
    assert product([2, 3, 7]) == 42 and product([]) == 1
    assert launch_grid(16384, 4, ceil_div=None) == 4096 and launch_grid(5, 16, ceil_div=None) == 1
    calls = []
    symbolic = object()  # a TensorRT shape expression: the grid is left to TensorRT's ceil_div
    assert launch_grid(symbolic, 1, ceil_div=None) is symbolic
    assert launch_grid(symbolic, 4, lambda n, d: calls.append((n, d)) or "cdiv") == "cdiv" and calls == [(symbolic, 4)]


def test_registering_without_tensorrt_says_what_is_missing():
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    from ticknorm.plugins.trt_plugin import register_plugin
    from ticknorm.base.errors import RuntimeUnavailable

    with pytest.raises(RuntimeUnavailable, match="needs TensorRT 10.9 or newer"):
        register_plugin()


def _fp16_ln_then_relu(opset: int, name: str = "", outputs=("y",)) -> onnx.ModelProto:
    """An unnamed fp16 LayerNormalization without bias on a dynamic batch, read by a Relu."""
    from ticknorm.base.scopes import SCOPE_KEY

    node = helper.make_node("LayerNormalization", ["x", "s"], list(outputs), name, epsilon=1e-3)
    node.metadata_props.add(key=SCOPE_KEY, value="norm")
    graph = helper.make_graph([node, helper.make_node("Relu", ["y"], ["z"], "relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT16, ["b", 8])],
                              [numpy_helper.from_array(np.ones(8, np.float16), "s")],
                              value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [17, 16])
def test_an_unnamed_norm_gets_its_position_as_name_and_a_zero_bias_after_the_weights(opset):
    """Below opset 17 (ONNX Runtime's fused op) the types come from a view of the graph at 17."""
    result = to_plugin_target(_fp16_ln_then_relu(opset))
    assert result.converted == ["LayerNormalization#0"] and not result.kept
    model = result.model
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset), (PLUGIN_NAMESPACE, 1)]
    plugin, relu = model.graph.node
    assert (plugin.name, plugin.domain, plugin.op_type) == ("LayerNormalization#0", PLUGIN_NAMESPACE, PLUGIN_NAME)
    assert list(plugin.input) == ["x", "s", "s.zero_bias"] and list(plugin.output) == ["y"] and list(relu.input) == ["y"]
    assert [(a.name, helper.get_attribute_value(a)) for a in plugin.attribute] == [
        ("axis", -1), ("epsilon", pytest.approx(1e-3)), ("plugin_namespace", b"ticknorm"), ("plugin_version", b"1")]
    assert [(p.key, p.value) for p in plugin.metadata_props] == [("ticknorm.scope", "norm")]
    assert [t.name for t in model.graph.initializer] == ["s", "s.zero_bias"]
    zero_bias = numpy_helper.to_array(model.graph.initializer[1])
    assert zero_bias.dtype == np.float16 and zero_bias.shape == (8,) and not zero_bias.any()
    # the graph's own annotations, nothing inferred (onnx-ir annotates the weights it writes)
    assert [v.name for v in model.graph.value_info if v.name != "s"] == ["y"]


def test_a_norm_kept_native_below_opset_17_is_refused():
    from ticknorm.base.errors import FusionError

    with pytest.raises(FusionError, match=r"LayerNormalization ln cannot go on the plugin \(its Mean/InvStdDev outputs "
                                          r"are used.*opset 16 has no LayerNormalization"):
        to_plugin_target(_fp16_ln_then_relu(16, "ln", ("y", "mean")))
