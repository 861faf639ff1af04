"""Issue 29: a file from each other exporter (made here the way it makes them, see every_exporter)
runs every ticknorm command, each judging the file alone against its own fp32 run on ONNX Runtime
CPU with inputs built from the graph: no --model, no --input."""

import json
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import pytest
import torch  # noqa: F401 - the warnings filter names torch.jit.TracerWarning
from click.testing import CliRunner

import every_exporter as made
from conftest import ort_run
from ticknorm.base.graph import bodies
from ticknorm.base.graph_feeds import feed_sets_for_graph
from ticknorm.cli import main
from ticknorm.exporter.fusion import fuse_norms
from ticknorm.exporter.fusion.verify import Checked, verify_fused

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::UserWarning",
                                        "ignore::DeprecationWarning")
FAST = ["--iterations", "2", "--warmup", "1"]


def _transformers():
    pytest.importorskip("transformers", reason="transformers is not installed (the BERT families)")


def _spox():
    pytest.importorskip("spox", reason="spox is not installed (`pip install spox`, in the test extra)")


def _optimum(path: Path, merged: bool) -> Path:
    """Optimum's decoder files of a tiny Llama: the decoder with past, or the merged one (the
    decoder in both branches of an If on `use_cache_branch`), as `foreign_files` writes them."""
    from foreign_files import merged_decoder, plain_decoder
    from hf_models import build

    return (merged_decoder if merged else plain_decoder)(build("LlamaForCausalLM"), path)


# family: (needs, build, norms inspect reports, where the first norm is, norms fuse finds)
FAMILIES = {
    "spox-vad": (_spox, lambda p: made.spox_model(p, vad=True), "0 fused, 2 decomposed", "(root): fusable (in", 2),
    "spox-plain": (_spox, lambda p: made.spox_model(p, vad=False), "0 fused, 1 decomposed", "(root): fusable", 1),
    "sentence-transformers": (_transformers, made.sentence_transformer_model, "0 fused, 5 decomposed",
                              "bert.encoder.layer.0.attention.output.LayerNorm: fusable", 5),
    "paddle2onnx": (lambda: None, made.paddle_model, "0 fused, 1 decomposed", "layer_norm_0: fusable", 1),
    "tf2onnx": (lambda: None, made.tf2onnx_model, "0 fused, 2 decomposed", "encoder.layer_0.LayerNorm_0: fusable", 2),
    "torch-bert-torchscript": (_transformers, lambda p: made.bert_model(p, dynamo=False), "5 fused, 0 decomposed",
                               None, 0),
    "torch-bert-dynamo": (_transformers, lambda p: made.bert_model(p, dynamo=True), "5 fused, 0 decomposed", None, 0),
    "torch-vad-dynamo": (lambda: None, made.torch_vad_model, "2 fused, 0 decomposed", None, 0),
    "optimum-decoder-with-past": (_transformers, lambda p: _optimum(p, merged=False), "0 fused, 5 decomposed",
                                  "model.layers.0.input_layernorm: fusable", 5),
    "optimum-merged-decoder": (_transformers, lambda p: _optimum(p, merged=True), "0 fused, 10 decomposed",
                               "model.layers.0.input_layernorm: fusable (in", 10),
}
# spox names no module, and dynamo's name scopes inside torch.cond's branches name only the op
NODE_ROWS = {"spox-vad", "spox-plain", "torch-vad-dynamo"}


class Made(NamedTuple):
    name: str
    path: Path
    norms: str  # what inspect says of the norms
    where: str | None  # where it says the first decomposed one is
    found: int  # norms fuse finds


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    needs, build, *expected = FAMILIES[request.param]
    needs()
    folder = tmp_path_factory.mktemp(request.param)
    return Made(request.param, build(folder / f"{request.param}.onnx"), *expected)


def run(*args):
    """One CLI call that exits by its code, never by an exception (a traceback)."""
    done = CliRunner().invoke(main, [str(a) for a in args])
    assert done.exception is None or isinstance(done.exception, SystemExit), done.output
    assert "Traceback" not in done.output
    return done


def test_inspect(family):
    done = run("inspect", family.path)
    assert done.exit_code == 0, done.output
    assert f"LayerNorm/RMSNorm: {family.norms}" in done.output
    assert family.where is None or re.search(rf"decomposed (LayerNorm|RMSNorm) at {re.escape(family.where)}",
                                             done.output)


def test_fuse_fuses_every_norm_and_the_file_runs(family, tmp_path):
    path, found = family.path, family.found
    done = run("fuse", path, "-o", tmp_path / "fused.onnx")
    assert done.exit_code == 0, done.output
    if found:
        assert re.search(rf"(LayerNorm|RMSNorm): found {found}, fused {found}, refused 0, left 0", done.output)
        assert "verified in ONNX Runtime" in done.output
    else:
        assert "no decomposed LayerNorm or RMSNorm found" in done.output
    original = onnx.load(str(path))
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    for feeds in feed_sets_for_graph(original):
        for name, value in ort_run(original, feeds).items():
            np.testing.assert_allclose(ort_run(fused, feeds)[name], value, atol=1e-5, rtol=1e-4)


def test_convert_to_fp16_converts_most_weights(family, tmp_path):
    path = family.path
    done = run("convert", path, "--precision", "fp16", "-o", tmp_path / "half.onnx")
    assert done.exit_code == 0, done.output
    share = re.search(r"weights in fp16: ([\d.]+)% of the float weights", done.output)
    assert share and float(share.group(1)) >= 50, done.output
    assert "judged by the fp16 graph itself, run by ONNX Runtime (CPU)" in done.output
    half = onnx.load(str(tmp_path / "half.onnx"))
    sizes = _float_weights(half)
    assert sizes[onnx.TensorProto.FLOAT16] > sizes[onnx.TensorProto.FLOAT], sizes  # If bodies too (spox-vad's)
    assert all(v.name in ort_run(half, feeds) for feeds in feed_sets_for_graph(half) for v in half.graph.output)


def _float_weights(model: onnx.ModelProto) -> Counter:
    """Elements of the float initializers and Constant values by type, in the graph and every body."""
    graphs = [model.graph, *(body for _, body in bodies(model.graph))]
    tensors = [t for g in graphs for t in g.initializer]
    tensors += [a.t for g in graphs for n in g.node if n.op_type == "Constant" for a in n.attribute
                if a.name == "value"]
    sizes: Counter = Counter()
    for tensor in tensors:
        if tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            sizes[tensor.data_type] += int(np.prod(tensor.dims))
    return sizes


def test_compare_per_layer(family):
    done = run("compare", family.path, "--runtime", "ort", "--per-layer")
    assert done.exit_code == 0, done.output
    assert "ort vs the file in fp32 on ort (CPU, graph optimizations off)" in done.output
    unit = "node" if family.name in NODE_ROWS else "module"
    assert f"ort: every tapped {unit} within tolerance" in done.output
    if unit == "module" and family.where:  # the norm's row is its exporter's layer
        assert f"\n  {family.where.split(':')[0]} " in done.output
    assert done.output.rstrip().endswith("PASS")


def test_profile(family, tmp_path):
    done = run("profile", family.path, "--runtime", "ort", *FAST, "--json", tmp_path / "p.json")
    assert done.exit_code == 0, done.output
    assert "ort: end-to-end" in done.output
    assert json.loads((tmp_path / "p.json").read_text())["rows"]


def test_report(family, tmp_path):
    done = run("report", family.path, "--runtime", "ort", *FAST, "-o", tmp_path / "x.html")
    assert done.exit_code == 0, done.output
    assert "PASS" in done.output and "vs the file in fp32 on ort" in (tmp_path / "x.html").read_text()


def test_drift_snapshot_then_check(family, tmp_path):
    snapped = run("drift", "snapshot", family.path, "-o", tmp_path / "bundle")
    assert snapped.exit_code == 0, snapped.output
    checked = run("drift", "check", tmp_path / "bundle", family.path)
    assert checked.exit_code == 0, checked.output
    assert re.search(r"\d+ (modules|nodes) checked, 0 drifted", checked.output)
    assert checked.output.rstrip().endswith("PASS")


def test_trtexec_command(family):
    done = run("trtexec-command", family.path)
    assert done.exit_code == 0, done.output
    line = done.output.splitlines()[0]
    assert line.startswith(f"trtexec --onnx={family.path.name} ")  # the name alone: it runs on the target host
    dynamic = [v.name for v in onnx.load(str(family.path), load_external_data=False).graph.input
               if any(d.dim_param or not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]
    assert all(f"{name}:" in line for name in dynamic)


def test_a_norm_fused_in_the_branch_the_feeds_do_not_take_is_checked_on_edge_rows(tmp_path):
    """The VAD's feeds take one branch of its If (`sr` is not 16000), and the norms' inputs have a
    symbolic batch: the other branch's norm is still cut out and fed edge rows, the batch sized as
    the feeds size it. Epsilon 0 there agrees on ordinary rows and gives NaN on an all-zero row."""
    _spox()
    original = onnx.load(str(made.spox_model(tmp_path / "vad.onnx", vad=True)))
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32), "sr": np.array(0, np.int64)}
    result = fuse_norms(original, feeds=feeds)
    assert result.report.verified and [r.status for r in result.report.records] == ["fused", "fused"]
    then_norm = next(n for holder, body in bodies(result.model.graph) if body.name.endswith("then_branch")
                     for n in body.node if n.op_type == "LayerNormalization")
    next(a for a in then_norm.attribute if a.name == "epsilon").f = 0.0
    inner = {r.output: r.input for r in result.report.records}
    checks = verify_fused(original, result.model, Checked({}, inner=inner), feeds).checks
    assert checks[then_norm.output[0]].reason.startswith("changes the numbers on an all-zero row")


def test_the_byte_classifiers_feeds_are_drawn_from_its_embedding_table(tmp_path):
    """Issue 29: its int32 bytes index a 256-row table; feeds in [0, 2) left most rows unread."""
    [feeds] = feed_sets_for_graph(onnx.load(str(made.tf2onnx_model(tmp_path / "bytes.onnx"))))
    assert feeds["bytes"].dtype == np.int32 and 2 <= feeds["bytes"].max() < 256 and feeds["bytes"].min() >= 0
