"""The command line as a user meets it: exit codes, one-line errors, nothing half-written."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import norm_modules as nm
from conftest import export
from ticknorm.cli import main
from ticknorm.exporter.fusion import rewrite as rewrite_module

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_transformer.py"
EXAMPLE_ARGS = ["--model", "examples/tiny_transformer.py:build", "--checkpoint",
                "examples/tiny_transformer.safetensors", "--input", "input_ids:batch=2xseq=16:int64:0..1000"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory):
    path = tmp_path_factory.mktemp("decomposed") / "ln13.onnx"
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 6, 16)).astype(np.float32)}
    onnx.save(export(nm.PowSqrtDiv(), feeds, "torchscript", opset=13), str(path))
    return path


def test_export_prints_fusion_and_accuracy_summary(tmp_path):
    result = run("export", *EXAMPLE_ARGS, "-o", tmp_path / "m.onnx", "--exporter", "torchscript")
    assert result.exit_code == 0, result.output
    assert "LayerNorm: found 4, fused 4, refused 0, left 0" in result.output
    assert "PyTorch vs ONNX Runtime (CPU):" in result.output and "ok" in result.output


def test_fuse_then_inspect(tmp_path, decomposed):
    out, report = tmp_path / "fused.onnx", tmp_path / "report.json"
    result = run("fuse", decomposed, "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    assert "opset raised 13 -> 17" in result.output
    assert json.loads(report.read_text())["records"][0]["status"] == "fused"
    before = run("inspect", decomposed)
    assert "LayerNorm/RMSNorm: 0 fused, 1 decomposed" in before.output
    assert "decomposed LayerNorm at (root): fusable" in before.output
    after = json.loads(run("inspect", out, "--json").output)
    assert (after["fused_norms"], after["decomposed_norms"], after["scope_coverage"]) == (1, 0, 1.0)
    assert after["inputs"] == [["x", [2, 6, 16], "float"]]


def test_fuse_at_an_opset_without_the_op_leaves_the_norm_and_says_so(tmp_path, decomposed):
    result = run("fuse", decomposed, "-o", tmp_path / "f.onnx", "--opset", "13")
    assert result.exit_code == 0, result.output
    assert "LayerNorm: found 1, fused 0, refused 0, left 1" in result.output
    assert "LayerNormalization needs opset 17, the target is 13 (fuse with --opset 17, or export with " \
           "--ln-target plugin)" in result.output
    fused = onnx.load(str(tmp_path / "f.onnx"))
    assert fused.opset_import[0].version == 13 and "ReduceMean" in [n.op_type for n in fused.graph.node]


def test_fuse_at_an_opset_without_the_op_fuses_onto_the_plugin(tmp_path, decomposed):
    result = run("fuse", decomposed, "-o", tmp_path / "f.onnx", "--opset", "13", "--ln-target", "plugin")
    assert result.exit_code == 0, result.output
    fused = onnx.load(str(tmp_path / "f.onnx"))
    assert [n.op_type for n in fused.graph.node].count("LayerNorm") == 1
    assert {o.domain: o.version for o in fused.opset_import}[""] == 13
    assert "LayerNormalization" not in [n.op_type for n in fused.graph.node]
    onnx.checker.check_model(fused)


def test_failed_verification_exits_1_and_writes_nothing(tmp_path, decomposed, monkeypatch):
    real_param = rewrite_module._param
    monkeypatch.setattr(rewrite_module, "_param", lambda value, *rest: real_param(np.asarray(value) + 1.0, *rest))
    result = run("fuse", decomposed, "-o", tmp_path / "f.onnx", "--report", tmp_path / "r.json")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: fusion changed the numbers of LayerNorm")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["inspect", "missing.onnx"], "error: ONNX file not found: missing.onnx"),
    (["fuse", "missing.onnx", "-o", "x.onnx"], "error: ONNX file not found: missing.onnx"),
    (["export", "--model", f"{EXAMPLE}:build", "--input", "input_ids:2xq:int64", "-o", "x.onnx"],
     "error: bad input spec 'input_ids:2xq:int64': dim 'q' is not SIZE or NAME=SIZE"),
    (["export", "--model", "nowhere.py:build", "--input", "x:2", "-o", "x.onnx"],
     "error: factory file not found: nowhere.py"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*args)
    assert result.exit_code == 2
    assert [line for line in result.stderr.splitlines() if not line.startswith("... ")] == [message]
    assert list(tmp_path.iterdir()) == []


def test_corrupt_onnx_gets_no_traceback_from_the_real_process(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf")
    done = subprocess.run([sys.executable, "-m", "ticknorm.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {bad} is not a readable ONNX model")
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_export_of_a_decoder_with_past_from_the_command_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hf_models import build

    build("GPT2LMHeadModel").save_pretrained(tmp_path / "gpt2")
    result = run("export", "--model", tmp_path / "gpt2", "--input", "input_ids:2x8:int64", "--task",
                 "text-generation-with-past", "-o", tmp_path / "g.onnx")
    assert result.exit_code == 0, result.output
    assert "logits (decode 2):" in result.output and "present.1.value (prefill):" in result.output
    assert transformers is not None


@pytest.mark.parametrize("args, message", [
    (["--task", "text-generation-with-past"], "error: --task text-generation-with-past needs a Hugging Face decoder; "
                                              "Small is not a transformers model"),
    (["--adapter", "tests"], "error: tests is not a PEFT adapter folder (no adapter_config.json); save the adapter "
                             "with model.save_pretrained(DIR) on the PeftModel"),
])
def test_bad_task_or_adapter_is_one_line_exit_2(tmp_path, args, message):
    result = run("export", "--model", "tests/factories.py:small", "--input", "x:2x8", "-o", tmp_path / "m.onnx", *args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == message  # after the progress lines
    assert list(tmp_path.iterdir()) == []
