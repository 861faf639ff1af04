"""The residual Add + norm passes of --target ort on hand-built graphs: `token_rows` (the default:
a post-LN residual over token rows, which ONNX Runtime's session keeps apart) and `skip_fused`
(--skip-norms: ONNX Runtime's Skip norms). Each pattern is run in ONNX Runtime before and after,
with the session's own optimizations on, as a user's session runs it."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ticknorm.base.scopes import SCOPE_KEY
from ticknorm.exporter.fusion.skip import skip_fused
from ticknorm.exporter.fusion.token_rows import token_rows

HIDDEN = 16
RNG = np.random.default_rng(0)


def _weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


BLOCK, NORM = "encoder.layer.0.output", "encoder.layer.0.output.LayerNorm"  # the scopes: BERT's


def _graph(nodes, inputs=("x", "r"), outputs=("y",), rank=3, dims=None) -> onnx.ModelProto:
    """`nodes` over float inputs of shape (batch, seq, HIDDEN) (rank 3) or (tokens, HIDDEN) (or
    `dims`), with a projection weight `w`, its bias `b`, and norm scales `g`, `beta`; the norm in
    its module's scope, the rest in the block's."""
    dims = dims or ["batch", "seq", HIDDEN][3 - rank:]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [_weight("w", HIDDEN, HIDDEN), _weight("b", HIDDEN), _weight("g", HIDDEN), _weight("beta", HIDDEN)])
    for node in graph.node:
        node.metadata_props.add(key=SCOPE_KEY, value=NORM if "Normalization" in node.op_type else BLOCK)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _post_ln(bias=True, norm="LayerNormalization", axis=-1, extra_reader=False, name="ln",
             dims=None) -> onnx.ModelProto:
    """BERT's output block: projection (+ bias), residual Add, norm of the sum."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"])]
    if bias:
        nodes.append(helper.make_node("Add", ["p", "b"], ["pb"]))
    nodes.append(helper.make_node("Add", ["pb" if bias else "p", "r"], ["s"]))
    params = ["g", "beta"] if norm == "LayerNormalization" else ["g"]
    nodes.append(helper.make_node(norm, ["s", *params], ["y"], name=name, axis=axis, epsilon=1e-12))
    outputs = ("y",)
    if extra_reader:  # pre-LN: the sum goes on to the next residual
        nodes.append(helper.make_node("Relu", ["s"], ["next"]))
        outputs = ("y", "next")
    return _graph(nodes, outputs=outputs, dims=dims)


def _feeds(batch=2, seq=5) -> dict[str, np.ndarray]:
    return {name: RNG.standard_normal((batch, seq, HIDDEN)).astype(np.float32) for name in ("x", "r")}


def _session(model: onnx.ModelProto, tmp_path, level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED):
    """The model's session and the ops it runs after its optimizations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, Counter(node.op_type for node in onnx.load(str(tmp_path / "session.onnx")).graph.node)


def _ops(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("bias, name", [(True, "ln"), (False, "ln"), (True, "")])
def test_a_post_ln_residual_goes_over_rows_and_onnx_runtime_keeps_its_layer_norm(tmp_path, bias, name):
    model = _post_ln(bias=bias, name=name)
    # the premise: ONNX Runtime's session fuses the graph as written into SkipLayerNormalization
    original, fused_ops = _session(model, tmp_path)
    assert fused_ops["SkipLayerNormalization"] == 1 and fused_ops["LayerNormalization"] == 0
    rewritten, count = token_rows(model)
    assert count == 1
    assert _ops(rewritten)["Flatten"] == 2 and _ops(rewritten)["Reshape"] == 1
    session, ops = _session(rewritten, tmp_path)
    assert (ops["SkipLayerNormalization"], ops["LayerNormalization"]) == (0, 1)
    for batch, seq in ((2, 5), (1, 9), (2, 0)):  # the shape comes back from the input, an empty sequence too
        feeds = _feeds(batch, seq)
        got, expected = session.run(None, feeds)[0], original.run(None, feeds)[0]
        assert got.shape == (batch, seq, HIDDEN)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    norm = next(node for node in rewritten.graph.node if node.op_type == "LayerNormalization")
    assert norm.name == name  # the norm keeps its name; its output, the graph's, is the Reshape's now
    assert [node.op_type for node in rewritten.graph.node if "y" in node.output] == ["Reshape"]
    names = [value for node in rewritten.graph.node for value in (node.name, *node.output)]
    assert len(names) - names.count("") == len(set(names) - {""})  # every name its own
    scopes = {node.op_type: {p.value for p in node.metadata_props if p.key == SCOPE_KEY}
              for node in rewritten.graph.node}
    assert scopes == {"MatMul": {BLOCK}, "Flatten": {BLOCK}, "Add": {BLOCK}, "LayerNormalization": {NORM},
                      "Shape": {NORM}, "Reshape": {NORM}}  # the sum stays the block's, the norm the norm's
    assert {a.name: helper.get_attribute_value(a) for a in norm.attribute}["epsilon"] == pytest.approx(1e-12)


@pytest.mark.parametrize("model", [
    pytest.param(_post_ln(extra_reader=True), id="pre-LN: the sum read again"),
    pytest.param(_post_ln(norm="SimplifiedLayerNormalization"), id="RMSNorm: ONNX Runtime fuses none"),
    pytest.param(_post_ln(axis=1), id="a norm over another axis"),
    pytest.param(_post_ln(dims=[None, None, HIDDEN]), id="unknown dims: the Add may broadcast"),
    pytest.param(_graph([helper.make_node("Add", ["x", "r"], ["s"]),
                         helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"])], rank=2),
                 id="rank-2 rows already"),
    pytest.param(_graph([helper.make_node("Add", ["x", "b"], ["s"]),
                         helper.make_node("LayerNormalization", ["s", "g", "beta"], ["y"])], inputs=("x",)),
                 id="a bias Add, no residual"),
])
def test_what_onnx_runtime_does_not_fuse_is_left_as_it_is(model):
    rewritten, count = token_rows(model)
    assert count == 0 and rewritten is model


def test_skip_norms_write_the_sum_only_where_it_is_read(tmp_path):
    """--skip-norms: a post-LN residual's sum, read by its norm alone, is no output of the Skip op
    (ONNX Runtime writes every named output); a pre-LN one's is, for the next residual."""
    for extra_reader, outputs in ((False, ["y"]), (True, ["y", "", "", "s"])):
        model = _post_ln(extra_reader=extra_reader)
        fused, count = skip_fused(model)
        assert count == 1
        skip = next(node for node in fused.graph.node if node.op_type == "SkipLayerNormalization")
        assert list(skip.output) == outputs
        assert len(skip.input) == 5  # the projection's bias folded in
        session, _ = _session(fused, tmp_path)
        original, _ = _session(model, tmp_path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        feeds = _feeds()
        for got, expected in zip(session.run(None, feeds), original.run(None, feeds), strict=True):
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
