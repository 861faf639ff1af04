"""Random integer feeds take the graph's own index ranges: ids of [0, 2) into a byte embedding
measure two of its 256 rows, and an fp16 plan made on them misses the rest."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from ticknorm.base.graph_feeds import feed_sets_for_graph
from ticknorm.base.inputs import Inputs, index_ranges
from ticknorm.cli import main

SHAPE = [4, 64]


def _table(name: str, rows: int, width: int = 8) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32), name)


def _graph(nodes, inputs, initializers, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _ids(name: str = "ids", elem=TensorProto.INT64) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, SHAPE)


def _out(name: str = "y") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _embedding(rows: int = 256) -> onnx.ModelProto:
    return _graph([helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)], [_ids()], [_table("table", rows)],
                  [_out()])


def feeds_for_graph(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return feed_sets_for_graph(model)[0]


def _spans(values: np.ndarray, rows: int) -> bool:
    return values.min() >= 0 and values.max() < rows and values.max() > rows * 0.9


def test_ids_into_an_embedding_span_its_rows():
    model = _embedding()
    assert index_ranges(model) == {"ids": 256}
    assert _spans(feeds_for_graph(model)["ids"], 256)
    given, _ = Inputs(("ids:4x64:int64",)).feeds(model)  # a spec without a range: the table's too
    assert _spans(given["ids"], 256)


def test_through_a_cast_and_into_the_smaller_of_two_tables():
    cast = helper.make_node("Cast", ["ids"], ["wide"], to=TensorProto.INT64)
    model = _graph([cast, helper.make_node("Gather", ["table", "wide"], ["y"])], [_ids(elem=TensorProto.INT32)],
                   [_table("table", 256)], [_out()])
    assert index_ranges(model) == {"ids": 256}
    feeds = feeds_for_graph(model)["ids"]
    assert feeds.dtype == np.int32 and _spans(feeds, 256)
    two = _graph([helper.make_node("Gather", ["big", "ids"], ["y"]), helper.make_node("Gather", ["small", "ids"], ["z"])],
                 [_ids()], [_table("big", 256), _table("small", 100)], [_out(), _out("z")])
    assert index_ranges(two) == {"ids": 100}
    assert _spans(feeds_for_graph(two)["ids"], 100)


def test_a_gathers_axis_a_constant_table_and_a_one_hot_depth():
    table = helper.make_node("Constant", [], ["half"], value=numpy_helper.from_array(np.zeros((8, 50), np.float16)))
    cast = helper.make_node("Cast", ["half"], ["table"], to=TensorProto.FLOAT)
    across = helper.make_node("Gather", ["table", "ids"], ["y"], axis=1)
    depth = helper.make_node("Constant", [], ["depth"], value=numpy_helper.from_array(np.array(30, np.int64)))
    hot = helper.make_node("OneHot", ["classes", "depth", "on_off"], ["z"])
    model = _graph([table, cast, across, depth, hot], [_ids(), _ids("classes")],
                   [numpy_helper.from_array(np.array([0, 1], np.float32), "on_off")], [_out(), _out("z")])
    assert index_ranges(model) == {"ids": 50, "classes": 30}


@pytest.mark.parametrize("name", ["ids", "attention_mask"])
def test_without_an_index_use_or_as_a_mask_integers_stay_0_or_1(name):
    unused = _graph([helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], [_ids()], [], [_out()])
    mask = _graph([helper.make_node("Gather", ["table", "attention_mask"], ["y"])], [_ids("attention_mask")],
                  [_table("table", 256)], [_out()])
    model = unused if name == "ids" else mask
    assert index_ranges(model) == {}
    assert set(np.unique(feeds_for_graph(model)[name])) == {0, 1}


def test_convert_measures_a_byte_classifier_on_every_byte(tmp_path, monkeypatch):
    from ticknorm import api

    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    head = numpy_helper.from_array(np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32), "head")
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["rows"]),
             helper.make_node("ReduceMean", ["rows", "axes"], ["mean"], keepdims=0),
             helper.make_node("MatMul", ["mean", "head"], ["y"])]
    path = tmp_path / "bytes.onnx"
    onnx.save(_graph(nodes, [_ids()], [_table("embedding", 256, 16), axes, head], [_out()]), path)
    measured = []
    convert_graph = api.convert_graph
    monkeypatch.setattr(api, "convert_graph", lambda model, feeds, *rest: measured.append(feeds)
                        or convert_graph(model, feeds, *rest))
    done = CliRunner().invoke(main, ["convert", str(path), "-o", str(tmp_path / "b16.onnx"), "--precision", "fp16"])
    assert done.exit_code == 0, done.output
    assert _spans(measured[0]["ids"], 256)
