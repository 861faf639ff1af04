"""A bf16 graph's fp32 emulation: what ONNX Runtime's CPU provider runs where it has no bf16 kernel."""

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ticknorm.base.scopes import SCOPE_KEY, get_scope
from ticknorm.base.upcast import upcast_bf16

BF16 = ml_dtypes.bfloat16


def _bf16_matmul_graph(weight: np.ndarray) -> onnx.ModelProto:
    """x (fp32) -> Cast to bf16 -> MatMul with a bf16 weight -> Add a bf16 constant -> Cast to fp32."""
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.BFLOAT16, name="in"),
             helper.make_node("MatMul", ["x16", "w"], ["y16"], name="mm"),
             helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array(1.0, BF16), "one")),
             helper.make_node("Add", ["y16", "one"], ["z16"], name="add"),
             helper.make_node("Cast", ["z16"], ["y"], to=TensorProto.FLOAT, name="out")]
    for node in nodes:
        node.metadata_props.add(key=SCOPE_KEY, value="proj")
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_the_upcast_runs_where_the_bf16_graph_cannot_and_rounds_as_bf16():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 4)).astype(BF16)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    model = _bf16_matmul_graph(weight)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(model.SerializeToString())
    upcast = upcast_bf16(model)
    assert [t.data_type for t in upcast.graph.initializer] == [TensorProto.BFLOAT16]  # not read: widened in the graph
    assert upcast.graph.node[0].op_type == "Cast" and upcast.graph.node[0].input[0] == "w"
    actual = ort.InferenceSession(upcast.SerializeToString()).run(None, {"x": x})[0]
    product = (x.astype(BF16).astype(np.float32) @ weight.astype(np.float32)).astype(BF16).astype(np.float32)
    expected = (product + 1.0).astype(BF16).astype(np.float32)
    np.testing.assert_allclose(actual, expected, atol=1e-6)
    assert np.array_equal(actual, actual.astype(BF16).astype(np.float32))  # every value a bf16 value
    assert {get_scope(n) for n in upcast.graph.node} == {"proj"}  # the rounding nodes stay on the module
