"""Small hand-built graphs that pin the graph layer's behaviour: local-function inlining (each
call's scope on its nodes), shape information that skips big weights, and external data written
beside the model with its weights record, staged weights saved without being read into memory."""

import json

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from ticknorm.base.functions import called_functions, inline_functions
from ticknorm.base.graph import coarsest_floats, typed
from ticknorm.base.external_data import external_entries
from ticknorm.base.onnx_io import (WEIGHTS_RECORD, has_external_weights, load_onnx, save_onnx,
                                   stage_weights)
from ticknorm.base.scopes import get_scope, set_scope

F = TensorProto.FLOAT


def _functions_model():
    """Two calls of a local `Scale` (x * alpha + bias; alpha an attribute reference), one of a
    local `Outer` that calls `Scale`, and a local function nobody calls."""
    scale = helper.make_function(
        "local", "Scale", ["x", "bias"], ["y"],
        [helper.make_node("Constant", [], ["alpha"], value_float=0.0),
         helper.make_node("Mul", ["x", "x"], ["sq"], name="square"),
         helper.make_node("Add", ["sq", "bias"], ["y"])],
        [helper.make_opsetid("", 17)])
    scale.node[0].attribute[0].ref_attr_name = "alpha"
    scale.node[0].attribute[0].ClearField("f")
    scale.attribute_proto.extend([helper.make_attribute("alpha", 1.0)])
    outer = helper.make_function("local", "Outer", ["x"], ["y"],
                                 [helper.make_node("Scale", ["x", "x"], ["y"], domain="local")],
                                 [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    unused = helper.make_function("local", "Unused", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                                  [helper.make_opsetid("", 17)])
    calls = [helper.make_node("Scale", ["x", "b"], ["h1"], name="/block.0/Scale", domain="local"),
             helper.make_node("Scale", ["h1", "b"], ["h2"], name="call2", domain="local"),
             helper.make_node("Outer", ["h2"], ["y"], name="call3", domain="local")]
    set_scope(calls[0], "block.0")
    calls[1].metadata_props.add(key="pkg.torch.onnx.name_scopes", value=repr(["", "block.1", "scale"]))
    set_scope(calls[2], "block.2")
    graph = helper.make_graph(calls, "g", [helper.make_tensor_value_info("x", F, [2])],
                              [helper.make_tensor_value_info("y", F, [2])],
                              [numpy_helper.from_array(np.float32([1, 2]), "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                             functions=[scale, outer, unused])


def test_inlining_gives_every_inlined_node_its_call_sites_scope():
    model = _functions_model()
    assert called_functions(model) == {"local::Scale": 2, "local::Outer": 1}
    inlined = inline_functions(model)
    assert not inlined.functions  # the uncalled one is dropped too
    nodes = list(inlined.graph.node)
    assert [n.op_type for n in nodes] == ["Constant", "Mul", "Add"] * 3
    assert [get_scope(n) for n in nodes] == ["block.0"] * 3 + ["block.1"] * 3 + ["block.2"] * 3
    assert len({n.name for n in nodes}) == 9 and len({o for n in nodes for o in n.output}) == 9
    assert nodes[2].output == ["h1"] and nodes[4].input == ["h1", "h1"] and nodes[-1].output == ["y"]
    alphas = [helper.get_attribute_value(n.attribute[0]) for n in nodes if n.op_type == "Constant"]
    assert alphas == [1.0, 1.0, 1.0]  # the default of the attribute the calls left out
    onnx.checker.check_model(inlined)
    import onnxruntime

    session = onnxruntime.InferenceSession(inlined.SerializeToString())
    x = np.float32([0.5, -1.0])
    h1 = x * x + [1, 2]
    h2 = h1 * h1 + [1, 2]
    expected = h2 * h2 + h2
    (model_output,) = session.run(None, {"x": x})
    assert np.allclose(model_output, expected)
    assert model.functions and len(model.graph.node) == 3  # the caller's model is left as it was


def test_a_model_that_calls_no_function_is_not_inlined():
    model = _functions_model()
    del model.graph.node[:]
    model.graph.node.append(helper.make_node("Identity", ["x"], ["y"]))
    assert inline_functions(model) is None and called_functions(model) == {}


def test_shape_information_skips_big_weights_and_keeps_their_types():
    big = numpy_helper.from_array(np.ones((64, 64), np.float16), "w")  # 8 KiB: a weight
    shape = numpy_helper.from_array(np.int64([1, 64, 64]), "shape")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["r"]),
         helper.make_node("Cast", ["r"], ["y"], to=F)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 64])],
        [helper.make_tensor_value_info("y", F, None)], [big, shape])
    view = typed(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    values = ir.convenience.create_value_mapping(view.graph)

    def dims(name):
        return tuple(d if isinstance(d, int) else d.value for d in values[name].shape)

    assert dims("m") == ("batch", 64) and values["m"].dtype == TensorProto.FLOAT16
    assert dims("r") == (1, 64, 64)  # data propagation through the small shape constant
    assert dims("w") == (64, 64) and values["w"].dtype == TensorProto.FLOAT16
    assert values["shape"].const_value.numpy().tolist() == [1, 64, 64] and values["y"].dtype == F
    assert coarsest_floats(view.graph)[values["y"]] == TensorProto.FLOAT16


def _weights_model(rows=64):
    weight = np.arange(rows * 64, dtype=np.float32).reshape(rows, 64)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", F, [1, rows])],
                              [helper.make_tensor_value_info("y", F, [1, 64])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.float32([2]), "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weight


def test_external_data_is_written_beside_the_model_with_its_weights_record(tmp_path):
    model, weight = _weights_model()
    save_onnx(model, tmp_path / "m.onnx", external_data_threshold=100)
    graph_only = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    record = json.loads(next(p.value for p in graph_only.metadata_props if p.key == WEIGHTS_RECORD))
    assert record["file"] == "m.onnx.data" and record["size"] == (tmp_path / "m.onnx.data").stat().st_size
    w, s = graph_only.graph.initializer
    assert external_entries(w)["location"] == "m.onnx.data" and s.raw_data  # a small one stays inline
    save_onnx(model, tmp_path / "m.onnx", external_data_threshold=100)  # over the pair in use: a new name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.1.data"]
    assert np.array_equal(numpy_helper.to_array(load_onnx(tmp_path / "m.onnx").graph.initializer[0]), weight)


def test_a_staged_model_is_saved_without_reading_its_weights_into_memory(tmp_path):
    model, weight = _weights_model(rows=1024)  # 256 KiB
    stage = tmp_path / "stage"
    stage.mkdir()
    onnx.save(model, str(stage / "exported.onnx"))
    staged = stage_weights(stage / "exported.onnx")
    assert has_external_weights(staged) and not staged.graph.initializer[0].raw_data
    partial = onnx.ModelProto()
    partial.CopyFrom(staged)
    partial.graph.initializer.extend([numpy_helper.from_array(np.full(600, 3, np.float32), "extra"),  # a rewrite's
                                      numpy_helper.from_array(np.ones(2**18, np.float32), "big")])  # 1 MiB
    reference = partial.graph.initializer[0]  # most of the staged file unused: the weights are written anew
    del reference.external_data[1:]
    reference.external_data.add(key="offset", value="0")
    reference.external_data.add(key="length", value=str(64 * 64 * 4))
    reference.dims[:] = [64, 64]
    partial.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 64
    save_onnx(partial, tmp_path / "new.onnx", external_data_threshold=0, weights_dir=stage)
    assert not partial.graph.initializer[0].raw_data and not partial.graph.initializer[-1].external_data
    linked = save_onnx(staged, tmp_path / "linked.onnx", external_data_threshold=0, weights_dir=stage)
    assert (tmp_path / "linked.onnx.data").stat().st_ino == (stage / "exported.onnx.data").stat().st_ino
    inline = save_onnx(staged, tmp_path / "inline.onnx", weights_dir=stage)
    assert [p.name for p in linked] == ["linked.onnx", "linked.onnx.data"] and [p.name for p in inline] == ["inline.onnx"]
    written = onnx.load(str(tmp_path / "new.onnx"), load_external_data=False)
    entries = {t.name: external_entries(t) for t in written.graph.initializer if t.external_data}
    assert entries["w"]["location"] == "new.onnx.data" and set(entries) == {"w", "extra", "big"}
    assert int(entries["big"]["offset"]) % 4096 == 0 and int(entries["big"]["offset"]) > 0  # page-aligned: mapped
    assert (tmp_path / "new.onnx.data").stat().st_ino != (stage / "exported.onnx.data").stat().st_ino
    loaded = {t.name: numpy_helper.to_array(t) for t in load_onnx(tmp_path / "new.onnx").graph.initializer}
    assert np.array_equal(loaded["w"], weight[:64]) and np.array_equal(loaded["extra"], np.full(600, 3, np.float32))
    inlined = {t.name: t for t in load_onnx(tmp_path / "inline.onnx").graph.initializer}
    assert np.array_equal(numpy_helper.to_array(inlined["w"]), weight) and not has_external_weights(
        onnx.load(str(tmp_path / "inline.onnx"), load_external_data=False))
