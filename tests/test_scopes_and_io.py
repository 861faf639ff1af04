import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ticknorm.base.errors import OnnxFileError
from ticknorm.base.scopes import annotate_scopes, common_scope, get_scope
from ticknorm.base.onnx_io import load_onnx, model_digest, save_onnx


def _node(name, inputs, outputs, op="Relu", dynamo_scopes=None):
    node = helper.make_node(op, inputs, outputs, name=name)
    if dynamo_scopes is not None:
        node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(dynamo_scopes))
    return node


def test_torchscript_names_resolve_against_real_module_paths():
    graph = helper.make_graph(
        [_node("/layers.0/layers.0.0/Gemm", ["x"], ["a"]), _node("/norm/ReduceMean", ["a"], ["b"]),
         _node("/layers.0/attention/MatMul", ["b"], ["c"]), _node("Constant_9", [], ["k"], "Constant"),
         _node("/Add", ["c", "k"], ["y"], "Add")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    annotate_scopes(model, ["", "layers", "layers.0", "layers.0.0", "layers.0.attention", "block", "block.norm"])
    assert [get_scope(n) for n in model.graph.node] == ["layers.0.0", "block.norm", "layers.0.attention", "", ""]


def test_dynamo_scopes_and_borrowed_scopes_for_constants():
    graph = helper.make_graph(
        [_node("c", [], ["k"], "Constant"), _node("n", ["x", "k"], ["y"], "Add", ["", "enc", "enc.layer.1", "add_3"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    annotate_scopes(model)
    assert [get_scope(n) for n in model.graph.node] == ["enc.layer.1", "enc.layer.1"]


def test_common_scope():
    assert common_scope(["enc.layer.1.ln", "enc.layer.1.ln"]) == "enc.layer.1.ln"
    assert common_scope(["enc.layer.1.ln", "enc.layer.10.ln"]) == "enc.layer"  # by segment, not by character
    assert common_scope([]) == ""


def test_save_is_atomic_and_external_data_round_trips(tmp_path):
    weight = np.arange(4096, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [onnx.numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph)
    files = save_onnx(model, tmp_path / "m.onnx", external_data_threshold=100)
    assert [f.name for f in files] == ["m.onnx", "m.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert np.array_equal(onnx.numpy_helper.to_array(load_onnx(tmp_path / "m.onnx").graph.initializer[0]), weight)
    assert np.array_equal(onnx.numpy_helper.to_array(model.graph.initializer[0]), weight)  # caller keeps its weights


def test_load_errors(tmp_path):
    with pytest.raises(OnnxFileError, match="not found"):
        load_onnx(tmp_path / "nope.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\xff\xff\xff")
    with pytest.raises(OnnxFileError, match="not a readable ONNX model"):
        load_onnx(tmp_path / "bad.onnx")


def test_the_graph_alone_leaves_large_weights_in_the_file_as_valid_references(tmp_path):
    """Each inline tensor of 1 KiB or more becomes external data whose location is the .onnx file
    itself; small tensors, nodes, If branches and metadata are as they were. ONNX loads the
    references back to the same weights, and ONNX Runtime runs the graph from them."""
    import onnxruntime

    from ticknorm.base.onnx_io import has_external_weights

    rng = np.random.default_rng(0)
    big, small = rng.standard_normal((64, 64)).astype(np.float32), np.float32([0.5, 2.0])
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["b"])], "then", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, [64, 64])])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(big, "w"), onnx.numpy_helper.from_array(small[:1], "s")])
    graph.node.append(helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch))
    graph.initializer.append(onnx.numpy_helper.from_array(np.bool_(True), "c"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.add(key="k", value="v")
    onnx.save(model, tmp_path / "m.onnx")

    alone = load_onnx(tmp_path / "m.onnx", weights=False)
    w, s, c = alone.graph.initializer
    assert has_external_weights(alone) and not w.raw_data and not w.float_data
    assert {e.key: e.value for e in w.external_data}["location"] == "m.onnx"
    assert s.raw_data and c.raw_data  # small: copied
    assert list(alone.graph.node) == list(model.graph.node) and alone.metadata_props == model.metadata_props
    assert model_digest(alone, tmp_path) == model_digest(load_onnx(tmp_path / "m.onnx"))
    (tmp_path / "refs.onnx").write_bytes(alone.SerializeToString())
    session = onnxruntime.InferenceSession(str(tmp_path / "refs.onnx"))  # reads the weights from m.onnx
    onnx.load_external_data_for_model(alone, str(tmp_path))
    assert np.array_equal(onnx.numpy_helper.to_array(alone.graph.initializer[0]), big)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    assert np.allclose(session.run(["y"], {"x": x})[0], x @ big * 0.5, atol=1e-5)
    (tmp_path / "cut.onnx").write_bytes((tmp_path / "m.onnx").read_bytes()[:-40])
    with pytest.raises(OnnxFileError, match="not a readable ONNX model"):
        load_onnx(tmp_path / "cut.onnx", weights=False)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_file_another_exporter_wrote_gets_its_scopes_from_its_node_names(tmp_path):
    """A plain torch.onnx.export (no ticknorm metadata): its TorchScript-style node names name the
    modules; inspect says where they came from, and fuse names each norm's module, not (root)."""
    import sys
    from pathlib import Path

    import torch

    from ticknorm import api

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from tiny_transformer import build

    torch.onnx.export(build().eval(), (torch.randint(0, 1000, (2, 16)),), str(tmp_path / "plain.onnx"), dynamo=False,
                      opset_version=17, input_names=["input_ids"])
    summary = api.inspect(tmp_path / "plain.onnx")
    assert summary.scope_coverage > 0.9 and summary.scope_sources["ticknorm"] == 0
    assert summary.scope_sources["torchscript node names"] > 0.9 * summary.nodes
    assert {scope for _, scope, _ in summary.decomposed} == {f"layers.{i}.{n}" for i in (0, 1)
                                                               for n in ("attention_norm", "output_norm")}
    result, _ = api.fuse(tmp_path / "plain.onnx", tmp_path / "fused.onnx")
    assert sorted(r.scope for r in result.report.records if r.status == "fused") == sorted(s for _, s, _ in summary.decomposed)
    fused = api.inspect(tmp_path / "fused.onnx")
    assert fused.scope_sources["ticknorm"] == fused.nodes  # written with them


def test_a_dynamo_file_without_ticknorm_scopes_reads_the_exporters_name_scopes(tmp_path):
    """A dynamo export as torch.onnx writes it (ticknorm's record taken out): the exporter's
    `pkg.torch.onnx.name_scopes` name the modules, and inspect says so."""
    from ticknorm import ExportOptions, Inputs, ModelRef, api
    from ticknorm.base.scopes import SCOPE_KEY

    api.export(ModelRef("examples/tiny_transformer.py:build"), Inputs(("input_ids:2x16:int64:0..1000",)),
               tmp_path / "m.onnx", ExportOptions(exporter="dynamo", fuse=False))
    model = onnx.load(str(tmp_path / "m.onnx"))
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != SCOPE_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.save(model, str(tmp_path / "plain.onnx"))
    summary = api.inspect(tmp_path / "plain.onnx")
    assert summary.scope_sources["ticknorm"] == 0 and summary.scope_sources["dynamo name scopes"] > 0.9 * summary.nodes
    assert {scope for _, scope, _ in summary.decomposed} >= {"layers.0.attention_norm", "layers.1.output_norm"}
