"""Node names from wrappers, tf2onnx and Paddle2ONNX map to modules; a graph whose names map to
none says so under --per-layer instead of printing nothing."""

import textwrap

import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper
from torch import nn

from ticknorm.base.scopes import annotate_scopes, ensure_scopes, fit_scopes, get_scope, scope_coverage, scope_sources
from ticknorm.cli import main


def _chain(names, outputs=None) -> onnx.ModelProto:
    """Relu nodes named `names`, each reading the one before, `x` in and the last out."""
    outputs = outputs or [f"t{i}" for i in range(len(names))]
    nodes = [helper.make_node("Relu", [src], [dst], name=name)
             for name, src, dst in zip(names, ["x", *outputs[:-1]], outputs)]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, [2, 4])],
                              [value(outputs[-1], TensorProto.FLOAT, [2, 4])])
    return helper.make_model(graph)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.output = nn.ReLU(), nn.ReLU()


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(), _Layer()])


class _Bert(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Encoder()


WRAPPED = ["/m/encoder/layer.0/attention/Relu", "/m/encoder/layer.0/output/Relu", "/m/encoder/layer.1/output/Relu"]
WRAPPED_SCOPES = ["encoder.layer.0.attention", "encoder.layer.0.output", "encoder.layer.1.output"]


def test_wrapper_prefix_maps_against_the_model_module_paths():
    paths = [name for name, _ in _Bert().named_modules()]
    model = _chain(WRAPPED)
    annotate_scopes(model, paths)
    assert [get_scope(n) for n in model.graph.node] == WRAPPED_SCOPES
    loaded = ensure_scopes(_chain(WRAPPED))  # a file read before the model is known keeps the names whole
    assert get_scope(loaded.graph.node[0]) == "m.encoder.layer.0.attention"
    fit_scopes(loaded, paths)  # and moves onto the module paths once it is
    assert [get_scope(n) for n in loaded.graph.node] == WRAPPED_SCOPES


def test_tf2onnx_names_become_layer_paths():
    names = ["StatefulPartitionedCall/model/encoder/layer_0/LayerNorm_0/moments/mean",
             "StatefulPartitionedCall/model/encoder/layer_0/LayerNorm_0/batchnorm/add",
             "model/encoder/layer_0/dense_1/MatMul", "model/encoder/layer_0/dense_1/BiasAdd", "model/Relu"]
    model = _chain(names)
    assert scope_coverage(model) == 1.0 and scope_sources(model)["tf2onnx names"] == 5
    ensure_scopes(model)
    assert [get_scope(n) for n in model.graph.node] == [
        "encoder.layer_0.LayerNorm_0", "encoder.layer_0.LayerNorm_0", "encoder.layer_0.dense_1",
        "encoder.layer_0.dense_1", ""]  # the Keras model's own name, shared by every node, is the root


def test_tf2onnx_names_keep_a_first_level_that_tells_layers_apart():
    model = ensure_scopes(_chain(["encoder/dense/MatMul", "decoder/dense/MatMul"]))
    assert [get_scope(n) for n in model.graph.node] == ["encoder.dense", "decoder.dense"]


def test_paddle_names_map_to_layers():
    model = _chain(["p2o.MatMul.12", "p2o.LayerNorm.3", "p2o.Relu.0"], ["linear_3.tmp_0", "t1", "t2"])
    assert scope_coverage(model) == 1.0 and scope_sources(model)["paddle names"] == 3
    ensure_scopes(model)
    assert [get_scope(n) for n in model.graph.node] == ["linear_3", "LayerNorm.3", "Relu.0"]


def test_per_layer_says_in_one_line_that_no_module_maps(tmp_path):
    onnx.save(_chain(["n0", "n1"], ["t0", "output"]), str(tmp_path / "flat.onnx"))
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.first, self.second = nn.ReLU(), nn.ReLU()

            def forward(self, x):
                return self.second(self.first(x))

        def build():
            return Net()
    """))
    model = f"{tmp_path / 'net.py'}:build"
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "flat.onnx"), "--model", model,
                                       "--input", "x:2x4:float32", "--per-layer"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("--per-layer:")]
    assert len(notes) == 1 and "no node of the graph maps to a module (scope coverage 0%)" in notes[0]
