"""The file alone: compare, profile, drift and report on an ONNX file without the PyTorch model it
came from, as a deployer on a target host has it. The reference is the file itself in fp32 on
ONNX Runtime's CPU provider with optimizations off, or what `--reference` names; rows are the
file's own modules, or its nodes where it names none."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from torch import nn

from ticknorm.base.scopes import LayerSelection, ensure_scopes, get_scope, scope_sources
from ticknorm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::UserWarning",
                                        "ignore::DeprecationWarning")
FAST = ["--iterations", "2", "--warmup", "1"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


class Deployed(nn.Module):
    """A wrapper nobody would pass as --model: its module paths are not the block's."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(Block())

    def forward(self, x):
        return self.inner(x) * 2.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A plain `torch.onnx.export` of a wrapped block (TorchScript names: `/inner/inner.0/fc1/...`),
    the same file with every scope gone (nodes renamed `n0`, `n1`, ...), and the first with its
    LayerNorm's scale changed (a planted wrong node)."""
    folder = tmp_path_factory.mktemp("alone")
    torch.manual_seed(0)
    plain = folder / "plain.onnx"
    with torch.no_grad():
        torch.onnx.export(Deployed().eval(), (torch.randn(2, 8),), str(plain), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    model = onnx.load(str(plain))
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for index, node in enumerate(bare.graph.node):
        node.name = f"n{index}"
        del node.metadata_props[:]
    onnx.save(bare, str(folder / "bare.onnx"))
    return {"plain": plain, "bare": folder / "bare.onnx", "planted": _planted(model, folder / "planted.onnx"),
            "bare_planted": _planted(bare, folder / "bare_planted.onnx")}


def _planted(model: onnx.ModelProto, path):
    """`model` with its LayerNorm's scale multiplied by 3: one node computes wrong numbers."""
    planted = onnx.ModelProto()
    planted.CopyFrom(model)
    norm = next(node for node in planted.graph.node if node.op_type == "LayerNormalization")
    scale = next(t for t in planted.graph.initializer if t.name == norm.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 3.0, scale.name))
    onnx.save(planted, str(path))
    return path


def _norm_row(path) -> str:
    """The row the planted node is: its module where the file names them, else its own name."""
    model = ensure_scopes(onnx.load(str(path)))
    norm = next(node for node in model.graph.node if node.op_type == "LayerNormalization")
    return get_scope(norm) or norm.name


def test_the_files_are_what_they_stand_for(files):
    assert _norm_row(files["plain"]) == "inner.0.norm"  # `/inner/inner.0/norm`: Sequential's full level
    counts = scope_sources(onnx.load(str(files["bare"])))
    assert sum(counts.values()) == counts["none"]  # no source names any node's module


@pytest.mark.parametrize("kind", ["plain", "bare"])
def test_compare_without_the_model_judges_the_file_against_itself_in_fp32(files, kind, tmp_path):
    done = run("compare", files[kind], "--per-layer", "--json", tmp_path / "c.json")
    assert done.exit_code == 0, done.output
    assert "ort vs the file in fp32 on ort (CPU, graph optimizations off)" in done.output
    unit = "module" if kind == "plain" else "node"
    assert f"ort: every tapped {unit} within tolerance" in done.output and done.output.rstrip().endswith("PASS")
    written = json.loads((tmp_path / "c.json").read_text())
    rows = {row["module"] for row in written["layers"]}
    assert written["unit"] == unit and _norm_row(files[kind]) in rows
    assert written["reference"].startswith("the file in fp32")


@pytest.mark.parametrize(("kind", "planted"), [("plain", "planted"), ("bare", "bare_planted")])
def test_compare_names_the_planted_wrong_node_against_the_original(files, kind, planted):
    """Only the file and a reference: the first row over tolerance is the edited node's."""
    done = run("compare", files[planted], "--reference", files[kind], "--per-layer")
    assert done.exit_code == 1, done.output
    unit = "module" if kind == "plain" else "node"
    assert f"ort vs {files[kind].name} in fp32 on ort (CPU, graph optimizations off)" in done.output
    assert f"ort: first {unit} over tolerance: {_norm_row(files[kind])}\n" in done.output
    rows = [line.split() for line in done.output.splitlines() if line.startswith("  ")]
    verdicts = [(row[0], row[-1]) for row in rows if len(row) == 5 and row[1] == "ort"]
    first_bad = next(index for index, (_, verdict) in enumerate(verdicts) if verdict == "FAIL")
    assert verdicts[first_bad][0] == _norm_row(files[kind]) and first_bad > 0  # rows before it are within
    alone = run("compare", files[planted])  # against itself it is consistent: why --reference matters
    assert alone.exit_code == 0, alone.output


def test_an_fp16_file_is_judged_against_its_fp32_widening_or_the_fp32_file_beside_it(files, tmp_path):
    from ticknorm.runtime.file_reference import computing_type

    model = onnx.load(str(files["plain"]))
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == onnx.TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float16)))
    del model.graph.value_info[:]
    onnx.save(model, str(tmp_path / "half.onnx"))
    assert computing_type(model) == "fp16"
    widened = run("compare", tmp_path / "half.onnx", "--per-layer")
    assert widened.exit_code == 0, widened.output
    assert "(atol 0.02, rtol 0.02)" in widened.output  # judged at fp16's tolerance
    beside = run("compare", tmp_path / "half.onnx", "--reference", files["plain"], "--per-layer")
    assert beside.exit_code == 0, beside.output
    assert "ort vs plain.onnx in fp32" in beside.output and "every tapped module within tolerance" in beside.output


def test_rows_without_a_twin_in_another_file_are_said_not_silently_dropped(files, tmp_path):
    """A file without scopes has its nodes as rows, by name (an unnamed one by its position): a
    copy whose nodes lost their names, one more in front, has no row in common with the original,
    and the output says so."""
    shifted = onnx.load(str(files["bare"]))
    for node in shifted.graph.node:
        node.name = ""
    first = shifted.graph.node[0]
    first.input[0], moved = "x_copy", first.input[0]
    shifted.graph.node.insert(0, onnx.helper.make_node("Identity", [moved], ["x_copy"]))
    onnx.save(shifted, str(tmp_path / "shifted.onnx"))
    done = run("compare", tmp_path / "shifted.onnx", "--reference", files["bare"], "--per-layer")
    assert done.exit_code == 0, done.output
    assert "--per-layer: none of the file's" in done.output and "has a twin in the reference" in done.output


def test_the_reference_is_refused_in_one_line_where_it_cannot_serve(files):
    for args, message in [
        (["--reference", "torch"], "--reference torch runs the PyTorch model"),
        (["--reference", "nope"], "unknown runtime 'nope'"),
        (["--reference", "ort-cuda"], "ort-cuda"),
        (["--runtime", "torch"], "torch runs the PyTorch model"),
        (["--reference", "ort", "--model", "x.py:build"], "--reference ort judges a file alone"),
        (["--reference", "missing.onnx"], "missing.onnx"),
    ]:
        bad = run("compare", files["plain"], *args)
        assert bad.exit_code == 2 and message in bad.stderr, (args, bad.output)
        said = [line for line in bad.stderr.splitlines() if not line.startswith("... ")]  # progress lines aside
        assert len(said) == 1 and said[0].startswith("error: "), bad.stderr


def test_an_absent_gpu_runtime_is_skipped_with_its_reason_not_faked(files):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this host has ort-cuda: the absent-runtime path is not reachable here")
    done = run("compare", files["plain"], "--runtime", "ort,ort-cuda")
    assert done.exit_code == 2 and "ort-cuda" in done.stderr and "CUDAExecutionProvider" in done.stderr
    assert "PASS" not in done.output


@pytest.mark.parametrize("kind", ["plain", "bare"])
def test_profile_without_the_model_has_the_files_modules_or_nodes_as_rows(files, kind, tmp_path):
    outputs = {flag: tmp_path / f"p.{flag}" for flag in ("json", "csv", "trace", "plot")}
    done = run("profile", files[kind], *FAST, *[a for flag, path in outputs.items() for a in (f"--{flag}", path)])
    assert done.exit_code == 0, done.output
    unit = "module" if kind == "plain" else "node"
    assert done.stdout.startswith(unit) and "ort ms (p10-p90)" in done.stdout and "torch" not in done.stdout
    written = json.loads(outputs["json"].read_text())
    rows = {row["module"] for row in written["rows"]}
    assert written["unit"] == unit and _norm_row(files[kind]) in rows
    assert all(path.stat().st_size > 0 for path in outputs.values())
    assert _norm_row(files[kind]) in outputs["csv"].read_text()
    refused = run("profile", files[kind], *FAST, "--runtime", "torch,ort")
    assert refused.exit_code == 2 and "give --model" in refused.stderr


def test_profile_imports_trtexec_files_onto_the_files_own_rows(files, tmp_path):
    model = ensure_scopes(onnx.load(str(files["plain"])))
    norm = next(node for node in model.graph.node if node.op_type == "LayerNormalization")
    matmul = next(node for node in model.graph.node if node.op_type in ("Gemm", "MatMul"))
    profile = [{"count": 10}, {"name": norm.name, "timeMs": 1.0, "averageMs": 0.1, "medianMs": 0.1, "percentage": 50},
               {"name": matmul.name, "timeMs": 1.0, "averageMs": 0.1, "medianMs": 0.1, "percentage": 50}]
    (tmp_path / "p.json").write_text(json.dumps(profile))
    done = run("profile", files["plain"], *FAST, "--runtime", "ort", "--trtexec-profile", tmp_path / "p.json",
               "--json", tmp_path / "out.json")
    assert done.exit_code == 0, done.output
    rows = {row["module"]: row for row in json.loads((tmp_path / "out.json").read_text())["rows"]}
    assert rows[get_scope(norm)]["trt (trtexec)"]["median_ms"] == pytest.approx(0.1)
    assert rows[get_scope(matmul)]["trt (trtexec)"]["median_ms"] == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["plain", "bare"])
def test_snapshot_and_check_without_the_model(files, kind, tmp_path):
    bundle = tmp_path / "bundle"
    done = run("drift", "snapshot", files[kind], "-o", bundle)
    assert done.exit_code == 0, done.output
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["reference"].startswith("the file in fp32 on ort") and meta["reference_precision"] == "fp32"
    assert meta["rows"] == ("module" if kind == "plain" else "node")
    assert _norm_row(files[kind]) in meta["layers"]
    assert "bundle.json" in json.loads((bundle / "manifest.json").read_text())["files"]
    checked = run("drift", "check", bundle, files[kind])
    assert checked.exit_code == 0, checked.output
    assert f"{len(meta['layers'])} {meta['rows']}s checked, 0 drifted" in checked.output  # rows said as they are
    planted = "planted" if kind == "plain" else "bare_planted"
    drifted = run("drift", "check", bundle, files[planted], "--allow-model-change", "--no-history")
    assert drifted.exit_code == 1 and f"first drifted {meta['rows']}: {_norm_row(files[kind])}" in drifted.output


@pytest.mark.parametrize("kind", ["plain", "bare"])
def test_report_without_the_model_says_its_reference(files, kind, tmp_path):
    page, data = tmp_path / "r.html", tmp_path / "r.json"
    done = run("report", files[kind], *FAST, "-o", page, "--json", data)
    assert done.exit_code == 0, done.output
    written = json.loads(data.read_text())
    assert written["meta"]["reference"].startswith("the file in fp32 on ort") and written["passed"]
    rows = {row["module"]: row for row in written["rows"]}
    assert rows[_norm_row(files[kind])]["passed"] == {"ort": True}
    text = page.read_text()
    assert "vs the file in fp32 on ort (CPU, graph optimizations off)" in text
    assert ("Rows are the file's modules" if kind == "plain" else "Rows are the file's nodes") in text
    wrong = run("report", files["planted"], *FAST, "-o", tmp_path / "w.html", "--reference", files["plain"])
    assert wrong.exit_code == 1 and "FAIL" in wrong.output


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    pytest.importorskip("transformers")
    from foreign_files import plain_decoder
    from hf_models import build

    folder = tmp_path_factory.mktemp("decoder")
    return plain_decoder(build("LlamaForCausalLM"), folder / "decoder_with_past.onnx")


def test_an_optimum_style_decoder_alone(decoder, tmp_path):
    """A KV-cache decoder's feeds are made from its graph (a decode step and a prefill); every
    command runs on its own module names."""
    compared = run("compare", decoder, "--per-layer", "--depth", "3")
    assert compared.exit_code == 0, compared.output
    assert "present.1.value (iteration 2)" in compared.output and "  model.layers.1 " in compared.output
    profiled = run("profile", decoder, *FAST, "--depth", "3", "--json", tmp_path / "p.json")
    assert profiled.exit_code == 0, profiled.output
    rows = {row["module"] for row in json.loads((tmp_path / "p.json").read_text())["rows"]}
    assert {"model.layers.0", "model.layers.1", "lm_head"} <= rows
    assert run("drift", "snapshot", decoder, "-o", tmp_path / "b").exit_code == 0
    assert run("drift", "check", tmp_path / "b", decoder).exit_code == 0
    reported = run("report", decoder, *FAST, "--depth", "3", "-o", tmp_path / "r.html")
    assert reported.exit_code == 0, reported.output


def test_a_callers_model_proto_is_judged_without_being_written_into(files):
    """The scopes and node rows ticknorm reads into a file stay in its own copy."""
    from ticknorm import api

    bare = onnx.load(str(files["bare"]))
    before = bare.SerializeToString()
    report = api.compare(bare, None, None, runtimes=["ort"], layers=LayerSelection(depth=None))
    assert report.passed and bare.SerializeToString() == before
