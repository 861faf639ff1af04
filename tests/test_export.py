"""End-to-end exports of real modules through both torch exporters."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ticknorm import api
from ticknorm.base.errors import AccuracyError, ExportError, InputSpecError
from ticknorm.base.scopes import get_scope, scope_coverage
from ticknorm.runtime.ort_runner import OrtRunner

EXAMPLE = dict(model="examples/tiny_transformer.py:build", checkpoint="examples/tiny_transformer.safetensors",
               inputs=["input_ids:batch=2xseq=16:int64:0..1000"])


@pytest.fixture(scope="module", params=["dynamo", "torchscript"])
def exported(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "tiny.onnx"
    report = path.with_suffix(".json")
    result = api.export(output=path, exporter=request.param, report=report, **EXAMPLE)
    return request.param, path, result, report


def test_example_exports_with_every_layer_norm_fused_and_scoped(exported):
    exporter, path, result, report = exported
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("LayerNormalization") == 5  # 4 hand-written + nn.LayerNorm
    assert "ReduceMean" not in ops and "Sqrt" not in ops
    assert result.fusion.count("fused") == 4 and result.fusion.verified
    assert scope_coverage(model) == 1.0
    scopes = {get_scope(n) for n in model.graph.node if n.op_type == "LayerNormalization"}
    assert scopes == {"layers.0.attention_norm", "layers.0.output_norm", "layers.1.attention_norm",
                      "layers.1.output_norm", "final_norm"}
    assert result.passed and result.accuracy[0].max_abs < 1e-4
    assert [r["status"] for r in json.loads(report.read_text())["records"]] == ["fused"] * 4


def test_dynamic_axes_accept_other_shapes(exported):
    _, path, _, _ = exported
    model = onnx.load(str(path))
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    module = api.load_model(EXAMPLE["model"], EXAMPLE["checkpoint"])
    ids = np.random.default_rng(5).integers(0, 1000, (3, 7))
    with torch.no_grad():
        expected = module(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(OrtRunner(model).infer({"input_ids": ids}).outputs["output"], expected, atol=1e-4)


def test_external_data_above_the_threshold(tmp_path):
    path = tmp_path / "tiny.onnx"
    result = api.export(output=path, external_data_threshold=1000, **EXAMPLE)
    assert result.files == [path, tmp_path / "tiny.onnx.data"]
    assert path.stat().st_size < 200_000 < (tmp_path / "tiny.onnx.data").stat().st_size
    model = onnx.load(str(path))
    ids = np.ones((1, 4), np.int64)
    assert OrtRunner(model).infer({"input_ids": ids}).outputs["output"].shape == (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx.data"]


def test_unexportable_op_names_the_op_and_module(tmp_path):
    for exporter in ("dynamo", "torchscript"):
        with pytest.raises(ExportError, match=r"aten::histc in module 'stats' \(HistogramStats\)"):
            api.export("tests/factories.py:histogram", tmp_path / "h.onnx", ["x:4x8"], exporter=exporter)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("inputs, error, match", [
    (["ids:2x16:int64"], InputSpecError, "has no parameter ids; it takes: input_ids"),
    (["input_ids:2x16:float32"], InputSpecError, "forward failed on these inputs"),
    (["input_ids:2x16:int64:0..5000"], InputSpecError, "forward failed on these inputs: IndexError"),
    ([], InputSpecError, "no inputs"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, inputs, error, match):
    with pytest.raises(error, match=match):
        api.export(EXAMPLE["model"], tmp_path / "m.onnx", inputs, checkpoint=EXAMPLE["checkpoint"])
    assert list(tmp_path.iterdir()) == []


def test_opset_outside_the_exporters_range_is_refused(tmp_path):
    with pytest.raises(InputSpecError, match="torchscript exporter writes opset 13-17, not 18; use --exporter dynamo"):
        api.export(output=tmp_path / "m.onnx", exporter="torchscript", opset=18, **EXAMPLE)
    with pytest.raises(InputSpecError, match="dynamo exporter writes opset 18 or newer, not 17"):
        api.export(output=tmp_path / "m.onnx", exporter="dynamo", opset=17, **EXAMPLE)


def test_nan_reference_output_is_refused(tmp_path):
    with pytest.raises(AccuracyError, match="NaN or Inf"):
        api.export("tests/factories.py:nan_output", tmp_path / "n.onnx", ["x:2x4"])
    assert list(tmp_path.iterdir()) == []


def test_npz_inputs_drive_the_export(tmp_path):
    np.savez(tmp_path / "in.npz", input_ids=np.arange(12, dtype=np.int64).reshape(2, 6))
    result = api.export(EXAMPLE["model"], tmp_path / "m.onnx", input_file=tmp_path / "in.npz",
                        checkpoint=EXAMPLE["checkpoint"], exporter="torchscript")
    assert result.passed
    dims = [d.dim_value for d in onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 6]


def test_hugging_face_directory_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    result = api.export(str(tmp_path / "bert"), tmp_path / "bert.onnx",
                        ["input_ids:batch=2xseq=8:int64:0..100", "attention_mask:batch=2xseq=8:int64:1..2"])
    assert result.passed
    model = onnx.load(str(tmp_path / "bert.onnx"))
    assert [o.name for o in model.graph.output][0] == "last_hidden_state"
    assert [n.op_type for n in model.graph.node].count("LayerNormalization") == 5
    assert scope_coverage(model) == 1.0


def test_arguments_the_graph_dropped_do_not_break_export_or_compare(tmp_path):
    result = api.export("tests/factories.py:ignores_mask", tmp_path / "m.onnx", ["x:2x8", "mask:2x8:int64"],
                        exporter="torchscript")
    assert result.passed
    report, _ = api.compare(tmp_path / "m.onnx", "tests/factories.py:ignores_mask", ["x:2x8", "mask:2x8:int64"])
    assert not report.passed  # a fresh factory call has other random weights than the exported one
    assert report.outputs["ort"][0].max_abs > 0


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("threshold", [api.PROTOBUF_LIMIT, 1000], ids=["inline", "external"])
def test_weights_staged_on_disk_make_the_same_model(exporter, threshold, tmp_path, monkeypatch):
    """Big models go through export, fusion, verification and the comparison with their weights in
    a file (here forced for a small one): the written model is whole and computes the same."""
    import tempfile

    from ticknorm.exporter import export as export_module

    monkeypatch.setattr(export_module, "WEIGHTS_ON_DISK_BYTES", 0)
    stages_before = set(Path(tempfile.gettempdir()).glob("ticknorm-weights-*"))
    result = api.export(output=tmp_path / "m.onnx", exporter=exporter, external_data_threshold=threshold, **EXAMPLE)
    assert result.passed and result.fusion.count("fused") == 4 and result.fusion.verified
    expected_files = ["m.onnx"] + (["m.onnx.data"] if threshold == 1000 else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == expected_files
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [n.op_type for n in model.graph.node].count("LayerNormalization") == 5
    module = api.load_model(EXAMPLE["model"], EXAMPLE["checkpoint"])
    ids = np.random.default_rng(7).integers(0, 1000, (3, 5))
    with torch.no_grad():
        reference = module(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(OrtRunner(model).infer({"input_ids": ids}).outputs["output"], reference, atol=1e-4)
    assert set(Path(tempfile.gettempdir()).glob("ticknorm-weights-*")) == stages_before  # the stage is gone
