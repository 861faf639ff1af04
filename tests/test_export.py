"""End-to-end exports of real modules through both torch exporters."""

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import ort_run
from ticknorm import ExportOptions, Inputs, ModelRef, api
from ticknorm.base.errors import AccuracyError, ExportError, InputSpecError
from ticknorm.base.onnx_io import PROTOBUF_LIMIT
from ticknorm.base.scopes import get_scope, scope_coverage
from ticknorm.exporter.export import export_model

MODEL = ModelRef("examples/tiny_transformer.py:build", "examples/tiny_transformer.safetensors")
INPUTS = Inputs(("input_ids:batch=2xseq=16:int64:0..1000",))


@pytest.fixture(scope="module", params=["dynamo", "torchscript"])
def exported(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "tiny.onnx"
    report = path.with_suffix(".json")
    result = api.export(MODEL, INPUTS, path, ExportOptions(exporter=request.param), report=report)
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
    module = MODEL.load()
    ids = np.random.default_rng(5).integers(0, 1000, (3, 7))
    with torch.no_grad():
        expected = module(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(ort_run(model, {"input_ids": ids})["output"], expected, atol=1e-4)


def test_external_data_above_the_threshold(tmp_path):
    path = tmp_path / "tiny.onnx"
    result = api.export(MODEL, INPUTS, path, ExportOptions(external_data_threshold=1000))
    assert result.files == [path, tmp_path / "tiny.onnx.data"]
    assert path.stat().st_size < 200_000 < (tmp_path / "tiny.onnx.data").stat().st_size
    model = onnx.load(str(path))
    ids = np.ones((1, 4), np.int64)
    assert ort_run(model, {"input_ids": ids})["output"].shape == (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx", "tiny.onnx.data"]


def test_unexportable_op_names_the_op_and_module(tmp_path):
    for exporter in ("dynamo", "torchscript"):
        with pytest.raises(ExportError, match=r"aten::histc in module 'stats' \(HistogramStats\)"):
            api.export("tests/factories.py:histogram", Inputs(("x:4x8",)), tmp_path / "h.onnx", ExportOptions(exporter=exporter))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("inputs, error, match", [
    (["ids:2x16:int64"], InputSpecError, "has no parameter ids; it takes: input_ids"),
    (["input_ids:2x16:float32"], InputSpecError, "the PyTorch model failed in module"),
    (["input_ids:2x16:int64:0..5000"], InputSpecError, "failed in module .embeddings. .Embedding.1000, 64.. on input_ids \\[2, 16\\] int64: IndexError"),
    ([], InputSpecError, "no inputs"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, inputs, error, match):
    with pytest.raises(error, match=match):
        api.export(MODEL, Inputs(tuple(inputs)), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_opset_outside_the_exporters_range_is_refused(tmp_path):
    with pytest.raises(InputSpecError, match="torchscript exporter writes opset 13-17, not 18; use --exporter dynamo"):
        api.export(MODEL, INPUTS, tmp_path / "m.onnx", ExportOptions(exporter="torchscript", opset=18))
    with pytest.raises(InputSpecError, match="dynamo exporter writes opset 18 or newer, not 17"):
        api.export(MODEL, INPUTS, tmp_path / "m.onnx", ExportOptions(exporter="dynamo", opset=17))


def test_nan_reference_output_is_refused(tmp_path):
    with pytest.raises(AccuracyError, match="NaN or Inf"):
        api.export("tests/factories.py:nan_output", Inputs(("x:2x4",)), tmp_path / "n.onnx")
    assert list(tmp_path.iterdir()) == []


def test_npz_inputs_drive_the_export(tmp_path):
    np.savez(tmp_path / "in.npz", input_ids=np.arange(12, dtype=np.int64).reshape(2, 6))
    result = api.export(MODEL, Inputs(file=tmp_path / "in.npz"), tmp_path / "m.onnx", ExportOptions(exporter="torchscript"))
    assert result.passed
    dims = [d.dim_value for d in onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 6]


def test_hugging_face_directory_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    result = api.export(str(tmp_path / "bert"), Inputs(("input_ids:batch=2xseq=8:int64:0..100",
                                                         "attention_mask:batch=2xseq=8:int64:1..2")), tmp_path / "bert.onnx")
    assert result.passed
    model = onnx.load(str(tmp_path / "bert.onnx"))
    assert [o.name for o in model.graph.output][0] == "last_hidden_state"
    assert [n.op_type for n in model.graph.node].count("LayerNormalization") == 5
    assert scope_coverage(model) == 1.0


def test_arguments_the_graph_dropped_do_not_break_export_or_compare(tmp_path):
    torch.save(_fresh_module("tests/factories.py:ignores_mask").state_dict(), tmp_path / "weights.pt")
    model = ModelRef("tests/factories.py:ignores_mask", str(tmp_path / "weights.pt"))
    inputs = Inputs(("x:2x8", "mask:2x8:int64"))
    result = api.export(model, inputs, tmp_path / "m.onnx", ExportOptions(exporter="torchscript"))
    assert result.passed
    assert [i.name for i in onnx.load(str(tmp_path / "m.onnx")).graph.input] == ["x"]  # the mask was dropped
    report = api.compare(tmp_path / "m.onnx", model, inputs)
    assert report.passed and report.outputs["ort"][0].max_abs < 1e-5
    other_weights = api.compare(tmp_path / "m.onnx", "tests/factories.py:ignores_mask", inputs)
    assert not other_weights.passed  # the same graph judged against another random init fails


def _fresh_module(factory: str):
    return ModelRef(factory).load()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("threshold", [PROTOBUF_LIMIT, 1000], ids=["inline", "external"])
def test_weights_staged_on_disk_make_the_same_model(exporter, threshold, tmp_path):
    """Every export goes through fusion, verification and the comparison with its weights in a
    staged file beside the output: the written model is whole and computes the same, and the stage
    is gone (the folder holds the written files only)."""
    out = tmp_path / "out"
    result = api.export(MODEL, INPUTS, out / "m.onnx", ExportOptions(exporter=exporter, external_data_threshold=threshold))
    assert result.passed and result.fusion.count("fused") == 4 and result.fusion.verified
    expected_files = ["m.onnx"] + (["m.onnx.data"] if threshold == 1000 else [])
    assert sorted(p.name for p in out.iterdir()) == expected_files
    model = onnx.load(str(out / "m.onnx"))
    assert [n.op_type for n in model.graph.node].count("LayerNormalization") == 5
    module = MODEL.load()
    ids = np.random.default_rng(7).integers(0, 1000, (3, 5))
    with torch.no_grad():
        reference = module(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(ort_run(model, {"input_ids": ids})["output"], reference, atol=1e-4)


def test_every_session_an_export_builds_runs(tmp_path, monkeypatch):
    """Four ONNX Runtime sessions per export, each of which runs: the original graph and the fused
    one, whose run is also the one compared with PyTorch, and both cut down to the norms for edge
    rows; and the weights never serialized whole
    by ticknorm (the exporter writes them into the stage once)."""
    import onnxruntime

    built, ran = [], set()

    class CountedSession(onnxruntime.InferenceSession):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(id(self))

        def run(self, *args, **kwargs):
            ran.add(id(self))
            return super().run(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", CountedSession)
    serialized, serialize = [], onnx.ModelProto.SerializeToString

    def counted(model, **kwargs):
        data = serialize(model, **kwargs)
        serialized.append(len(data))
        return data

    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", counted)
    weights = sum(p.numel() * 4 for p in MODEL.load().parameters())
    api.export(MODEL, INPUTS, tmp_path / "m.onnx", ExportOptions(exporter="torchscript"))
    # and two more, each graph cut down to its fused norms, for the edge rows fed to their inputs (issue 29)
    assert len(built) == 4 and set(built) == ran
    # whatever ticknorm serializes before the final write holds references to the staged weights, not them
    # no message ever held the weights: the graph holds references, the final write streams one tensor at a time
    assert max(serialized) < weights / 2 and sum(serialized) > weights


def test_every_iteration_of_an_inputs_file_is_checked_on_export(tmp_path):
    from polygraphy.json import save_json

    rng = np.random.default_rng(4)
    save_json([{"input_ids": rng.integers(0, 1000, (2, 6))} for _ in range(3)], str(tmp_path / "inputs.json"))
    result = api.export(MODEL, Inputs(file=str(tmp_path / "inputs.json")), tmp_path / "m.onnx",
                        ExportOptions(exporter="torchscript"))
    assert [c.name for c in result.accuracy] == ["output", "output (iteration 2)", "output (iteration 3)"]
    assert result.passed


def test_a_model_ticknorm_loaded_is_freed_once_exported_and_a_callers_is_not(tmp_path):
    """ONNX Runtime's sessions then never hold the weights beside PyTorch's (a 1.1B model's
    peak drops by its weights); a module the caller passed stays whole."""
    module = MODEL.load()
    freed = export_model(module, {"input_ids": np.random.default_rng(0).integers(0, 1000, (2, 16))}, tmp_path / "a.onnx",
                         ExportOptions(exporter="torchscript", release_model=True))
    assert freed.passed and freed.fusion.verified
    assert all(p.device.type == "meta" for p in module.parameters())
    kept = MODEL.load()
    assert api.export(ModelRef(kept), INPUTS, tmp_path / "b.onnx", ExportOptions(exporter="torchscript")).passed
    assert all(p.device.type == "cpu" for p in kept.parameters())


def test_dynamo_leaves_nothing_holding_the_weights_of_a_model_it_frees(tmp_path):
    """The dynamo exporter keeps the weights referenced after it returns; it runs in a forked
    child, so here the released model's tensors really go (measured: a 1.1B Llama's peak then
    drops by its weights)."""
    import gc
    import weakref

    module = MODEL.load()
    originals = [weakref.ref(p) for p in module.parameters()]
    result = export_model(module, {"input_ids": np.random.default_rng(0).integers(0, 1000, (2, 16))}, tmp_path / "a.onnx",
                          ExportOptions(exporter="dynamo", release_model=True))
    assert result.passed and result.fusion.verified
    gc.collect()
    assert [ref() for ref in originals] == [None] * len(originals)


def test_the_isolated_exporter_reports_its_failure_in_one_line():
    import os
    import signal

    from ticknorm.exporter.isolated import run_isolated

    def fails():
        raise ValueError("shape mismatch in layer 3")

    with pytest.raises(ExportError, match="^the exporter failed: ValueError: shape mismatch in layer 3$"):
        run_isolated(fails)
    with pytest.raises(ExportError, match="^no translation for aten::foo$"):
        run_isolated(lambda: (_ for _ in ()).throw(ExportError("no translation for aten::foo")))
    with pytest.raises(ExportError, match=r"killed by SIGKILL \(out of memory\?\)"):
        run_isolated(lambda: os.kill(os.getpid(), signal.SIGKILL))
    run_isolated(lambda: None)
