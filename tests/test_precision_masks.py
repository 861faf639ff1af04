"""Attention masks in an fp32 run: `Where(mask, 0, -inf)` and additive masks at float32's lowest
value put -inf or -3.4e38 inside the graph by design while its outputs stay finite. Those are no
reason to refuse a conversion; NaN, or an infinity in an output, still is."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from ticknorm import ExportOptions, Inputs, ModelRef, Precision, api
from ticknorm.cli import main

FLOAT, BOOL = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL
LOWEST = float(np.finfo(np.float32).min)
RNG = np.random.default_rng(0)
Q, K, V = (RNG.standard_normal(shape).astype(np.float32) for shape in ((2, 4, 8), (2, 8, 4), (2, 4, 8)))
KEEP = RNG.random((2, 4, 4)) < 0.6
KEEP[..., 0] = True  # every query sees a key: no row is masked whole


def _attention(mask_nodes: list, mask_input) -> onnx.ModelProto:
    """softmax(q @ k + mask) @ v, the mask made by `mask_nodes` as `bias` from `mask_input`."""
    nodes = [helper.make_node("MatMul", ["q", "k"], ["scores"], name="scores"), *mask_nodes,
             helper.make_node("Add", ["scores", "bias"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["out"], name="context")]
    inputs = [helper.make_tensor_value_info(name, FLOAT, list(array.shape)) for name, array in zip("qkv", (Q, K, V))]
    graph = helper.make_graph(nodes, "attention", [*inputs, mask_input],
                              [helper.make_tensor_value_info("out", FLOAT, [2, 4, 8])],
                              [numpy_helper.from_array(np.array(0, np.float32), "zero"),
                               numpy_helper.from_array(np.array(-np.inf, np.float32), "minus_inf")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _where_mask() -> tuple[onnx.ModelProto, dict]:
    where = helper.make_node("Where", ["mask", "zero", "minus_inf"], ["bias"], name="mask_bias")
    return (_attention([where], helper.make_tensor_value_info("mask", BOOL, [2, 4, 4])),
            {"q": Q, "k": K, "v": V, "mask": KEEP})


def _additive_mask(combined: bool = False) -> tuple[onnx.ModelProto, dict]:
    """A padding mask at float32's lowest value; `combined`, added to itself as a causal mask is
    added to a padding mask, which overflows the masked places to -inf in fp32."""
    make = helper.make_node("Add", ["mask", "mask"], ["bias"], name="mask_bias") if combined else \
        helper.make_node("Identity", ["mask"], ["bias"], name="mask_bias")
    additive = np.where(KEEP, 0, LOWEST).astype(np.float32)
    return (_attention([make], helper.make_tensor_value_info("mask", FLOAT, [2, 4, 4])),
            {"q": Q, "k": K, "v": V, "mask": additive})


def _convert(model: onnx.ModelProto, feeds: dict, tmp_path):
    onnx.save(model, str(tmp_path / "a.onnx"))
    np.savez(tmp_path / "feeds.npz", **feeds)
    return CliRunner().invoke(main, ["convert", str(tmp_path / "a.onnx"), "-o", str(tmp_path / "c.onnx"),
                                     "--precision", "fp16", "--input-file", str(tmp_path / "feeds.npz"),
                                     "--report", str(tmp_path / "c.json")])


def test_a_minus_inf_mask_converts_and_computes_in_fp16(tmp_path):
    """-inf is exact in fp16: the mask, its Add and the Softmax all compute low."""
    done = _convert(*_where_mask(), tmp_path)
    assert done.exit_code == 0, done.output
    assert "fp16: 0 node(s) kept in fp32" in done.output
    assert all(check["passed"] for check in json.loads((tmp_path / "c.json").read_text())["checks"])


def test_an_additive_mask_at_float32s_lowest_keeps_its_ops_in_fp32(tmp_path):
    """-3.4e38 is past fp16's range: the ops that read or write it are islands, not a refusal."""
    done = _convert(*_additive_mask(), tmp_path)
    assert done.exit_code == 0, done.output
    islands = {island["node"]: island["reason"]
               for island in json.loads((tmp_path / "c.json").read_text())["precision"]["islands"]}
    assert {"mask_bias", "add_mask", "softmax"} <= set(islands) and "scores" not in islands
    assert "> fp16 max 65504" in islands["add_mask"]


def test_masks_added_past_float32s_range_convert(tmp_path):
    """Two masks at -3.4e38 added make -inf in fp32: the sum computes in fp16, where -inf is exact;
    only the op that reads the mask itself stays fp32."""
    done = _convert(*_additive_mask(combined=True), tmp_path)
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "c.json").read_text())
    assert [island["node"] for island in report["precision"]["islands"]] == ["mask_bias"]
    assert all(check["passed"] for check in report["checks"])


@pytest.mark.parametrize("op, what", [("Sqrt", "NaN"), ("Reciprocal", "Inf")])
def test_an_fp32_output_holding_nan_or_inf_is_still_refused(op, what, tmp_path):
    x = np.array([[-1.0, 0.0, 4.0]], np.float32)
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "bad",
                              [helper.make_tensor_value_info("x", FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", FLOAT, [1, 3])])
    bad = _convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": x}, tmp_path)
    assert bad.exit_code == 2 and "already holds NaN or Inf (first in 'y')" in bad.stderr, what
    assert not (tmp_path / "c.onnx").exists()


def test_a_torchscript_bert_export_converts_to_fp16(tmp_path):
    """TorchScript exports BERT's attention mask as `Where(mask, 0, -inf)`."""
    pytest.importorskip("transformers")
    from hf_models import CONFIGS, build

    options = ExportOptions(exporter="torchscript", precision=Precision("fp16"))
    result = api.export(ModelRef(build("BertModel")), Inputs(tuple(CONFIGS["BertModel"][1])), tmp_path / "b.onnx",
                        options)
    assert result.conversion.passed and Precision.of_graph(onnx.load(str(tmp_path / "b.onnx"))).dtype == "fp16"
