"""Opset 23's RotaryEmbedding: the exporter's broadcast caches expanded to the batch, so ONNX
Runtime runs the standard op and computes what ONNX's reference evaluator computes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from ticknorm import ExportOptions, Inputs, api
from ticknorm.base.scopes import SCOPE_KEY, get_scope
from ticknorm.exporter.rotary import expand_rotary_caches


def _rotary_graph(cache_batch: int) -> onnx.ModelProto:
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], name="rope")
    node.metadata_props.add(key=SCOPE_KEY, value="model.layers.0.self_attn")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 16])
    caches = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [cache_batch, 8, 8]) for name in ("cos", "sin")]
    graph = helper.make_graph([node], "rope", [x, *caches], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8, 16])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_broadcast_caches_run_after_the_expansion_and_match_the_reference():
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 4, 8, 16)).astype(np.float32),
             "cos": rng.standard_normal((1, 8, 8)).astype(np.float32), "sin": rng.standard_normal((1, 8, 8)).astype(np.float32)}
    model = _rotary_graph(1)
    with pytest.raises(Exception, match="cos_cache"):  # the installed ONNX Runtime refuses the broadcast as written
        ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    assert expand_rotary_caches(model) == 1
    onnx.checker.check_model(model)
    actual = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    per_batch = {**feeds, "cos": np.repeat(feeds["cos"], 2, 0), "sin": np.repeat(feeds["sin"], 2, 0)}
    expected = ReferenceEvaluator(_rotary_graph(2)).run(None, per_batch)[0]
    np.testing.assert_allclose(actual, expected, atol=1e-6)
    assert {get_scope(n) for n in model.graph.node} == {"model.layers.0.self_attn"}  # new nodes on the op's module


def test_a_rotary_with_position_ids_is_left_alone():
    model = _rotary_graph(1)
    model.graph.node[0].input.append("position_ids")
    assert expand_rotary_caches(model) == 0 and len(model.graph.node) == 1


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_opset_23_llms_export_and_run(architecture, tmp_path):
    from hf_models import build

    folder = tmp_path / "model"
    build(architecture).save_pretrained(folder)
    result = api.export(str(folder), Inputs(("input_ids:batch=2xseq=8:int64",)), tmp_path / "m.onnx",
                        ExportOptions(opset=23, task="text-generation-with-past"))
    assert result.passed and result.opset == 23
    assert any("RotaryEmbedding" in note for note in result.notes)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "RotaryEmbedding" in ops and ops.count("RMSNormalization") == 5
