"""Issue 29: every fusion is checked on edge rows too, and what no run needs to show is refused
before one (an epsilon the fused op's float attribute cannot hold, a mean over the batch axis)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ticknorm.exporter.fusion import fuse_norms
from ticknorm.exporter.fusion.verify import Checked, edge_feeds, verify_fused

SHAPE = [2, 3, 8]


def _layer_norm(eps=1e-5, axes=(-1,), dtype=np.float32, shape=SHAPE):
    """x -> y, a LayerNorm decomposed over `axes` with a scale and bias over the last axis."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    consts = {"axes": np.array(axes, np.int64), "two": np.array(2.0, dtype), "eps": np.array(eps, dtype),
              "scale": np.linspace(0.5, 1.5, shape[-1]).astype(dtype),
              "bias": np.linspace(-1, 1, shape[-1]).astype(dtype)}
    nodes = [helper.make_node(op, inputs, [out], name=out) for op, inputs, out in [
        ("ReduceMean", ["x", "axes"], "mean"), ("Sub", ["x", "mean"], "d"), ("Pow", ["d", "two"], "sq"),
        ("ReduceMean", ["sq", "axes"], "var"), ("Add", ["var", "eps"], "ve"), ("Sqrt", ["ve"], "std"),
        ("Div", ["d", "std"], "normed"), ("Mul", ["normed", "scale"], "scaled"), ("Add", ["scaled", "bias"], "y")]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, shape)],
                              [helper.make_tensor_value_info("y", elem, shape)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _feeds(dtype=np.float32):
    return {"x": np.random.default_rng(5).standard_normal(SHAPE).astype(dtype)}


def _refused(model, feeds):
    result = fuse_norms(model, feeds=feeds)
    [record] = result.report.records
    assert record.status == "refused"
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in model.graph.node]
    return record.reason


def test_an_epsilon_float32_cannot_hold_is_refused_and_the_graph_kept():
    reason = _refused(_layer_norm(eps=1e-50, dtype=np.float64), _feeds(np.float64))
    assert reason.startswith("epsilon 1e-50 underflows the fused op's float attribute")


def test_a_mean_over_every_axis_is_refused():
    assert _refused(_layer_norm(axes=(0, 1, 2)), _feeds()) == "the mean is over every axis, batch included"


def test_a_normal_layer_norm_is_fused_and_passes_the_edge_rows():
    result = fuse_norms(_layer_norm(), feeds=_feeds())
    assert result.report.verified and [r.status for r in result.report.records] == ["fused"]
    assert [n.op_type for n in result.model.graph.node] == ["LayerNormalization"]


def test_a_float64_layer_norm_stays_float64():
    """ORT's LayerNormalization computes doubles in double: the fused op keeps the graph's type."""
    result = fuse_norms(_layer_norm(dtype=np.float64), feeds=_feeds(np.float64))
    assert result.report.verified and [r.status for r in result.report.records] == ["fused"]
    [fused] = result.model.graph.node
    weights = {t.name: t.data_type for t in result.model.graph.initializer}
    assert {weights[name] for name in fused.input[1:]} == {TensorProto.DOUBLE}
    assert result.model.graph.output[0].type.tensor_type.elem_type == TensorProto.DOUBLE


def test_edge_rows_catch_a_fused_op_that_differs_only_there():
    """Epsilon 0 agrees on seeded rows and gives NaN on an all-zero row, where the original gives the bias."""
    original = _layer_norm()
    fused = onnx.ModelProto()
    fused.CopyFrom(original)
    del fused.graph.node[:]
    fused.graph.node.append(helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], epsilon=0.0))
    checks = verify_fused(original, fused, Checked({"y": TensorProto.FLOAT}, sources={"y": "x"}), _feeds()).checks
    assert not checks["y"].passed and checks["y"].reason.startswith("changes the numbers on an all-zero row")


def test_edge_feeds_keep_integer_inputs():
    feeds = {"x": np.ones((2, 2), np.float32), "ids": np.arange(4).reshape(2, 2)}
    edges = edge_feeds(feeds)
    assert list(edges) == ["an all-zero row", "a constant row", "a row around 1e4", "a row around 1e-6"]
    assert all(edge["ids"] is feeds["ids"] for edge in edges.values())
    assert edges["a row around 1e4"]["x"].max() == 1e4 and not edges["an all-zero row"]["x"].any()


def _fed_ids(model):
    """`model` with `x` looked up from a table by int64 ids, as a language model's norms are fed."""
    fed = onnx.ModelProto()
    fed.CopyFrom(model)
    table = np.random.default_rng(6).standard_normal((10, SHAPE[-1])).astype(np.float32)
    fed.graph.initializer.append(numpy_helper.from_array(table, "table"))
    fed.graph.node.insert(0, helper.make_node("Gather", ["table", "ids"], ["x"], name="embed"))
    del fed.graph.input[:]
    fed.graph.input.append(helper.make_tensor_value_info("ids", TensorProto.INT64, SHAPE[:-1]))
    return fed


def test_edge_rows_reach_a_norm_fed_by_token_ids():
    original = _fed_ids(_layer_norm())
    fused = onnx.ModelProto()
    fused.CopyFrom(original)
    del fused.graph.node[1:]
    fused.graph.node.append(helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], epsilon=0.0))
    feeds = {"ids": np.arange(6).reshape(SHAPE[:-1])}
    checks = verify_fused(original, fused, Checked({"y": TensorProto.FLOAT}, sources={"y": "x"}), feeds).checks
    assert not checks["y"].passed and checks["y"].reason.startswith("changes the numbers on an all-zero row")
    assert fuse_norms(_fed_ids(_layer_norm()), feeds=feeds).report.verified
