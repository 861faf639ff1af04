"""Files other exporters wrote (made here as they make them, see `foreign_files`): every command
works on them against the Hugging Face folder they came from."""

import json

import numpy as np
import onnx
import pytest
import torch  # noqa: F401 - the warnings filter names torch.jit.TracerWarning

from ticknorm import Inputs, Timing, api
from ticknorm.base.errors import OnnxFileError
from ticknorm.base.graph import bodies
from ticknorm.base.scopes import LayerSelection

transformers = pytest.importorskip("transformers")
from foreign_files import merged_decoder, plain_decoder  # noqa: E402
from hf_models import build  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::UserWarning")
IDS = Inputs(("input_ids:2x4:int64:0..100",))
NORMS = {f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")} | {"model.norm"}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama's save_pretrained folder, its Optimum-style decoder with past, and the merged one."""
    folder = tmp_path_factory.mktemp("foreign")
    model = build("LlamaForCausalLM")
    model.save_pretrained(folder / "hf")
    return folder / "hf", plain_decoder(model, folder / "decoder_with_past.onnx"), merged_decoder(model, folder / "merged.onnx")


def test_a_plain_decoder_export_is_inspected_fused_and_compared_by_output_name(llama, tmp_path):
    folder, plain, _ = llama
    summary = api.inspect(plain)
    assert summary.scope_coverage >= 0.9 and summary.scope_sources["torchscript node names"] > 0.9 * summary.nodes
    assert {scope for _, scope, _ in summary.decomposed} == NORMS
    result, _ = api.fuse(plain, tmp_path / "fused.onnx")  # no flags: every RMSNorm, ORT's op below opset 23
    assert result.report.count("fused", "RMSNorm") == 5 and result.report.verified
    assert "SimplifiedLayerNormalization: ONNX Runtime only" in result.report.summary()
    ops = [n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 5
    report = api.compare(tmp_path / "fused.onnx", str(folder), IDS, runtimes=["ort"])
    names = [c.name for c in report.outputs["ort"]]
    assert report.passed and names == ["logits", *(f"present.{i}.{k}" for i in (0, 1) for k in ("key", "value"))]


def test_a_merged_decoder_is_seen_fused_and_verified_in_both_branches(llama, tmp_path):
    _, _, merged = llama
    model = onnx.load(str(merged))
    assert [n.op_type for n in model.graph.node] == ["If"]
    summary = api.inspect(merged)
    assert summary.scope_coverage >= 0.9
    assert len(summary.decomposed) == 10 and {scope for _, scope, _ in summary.decomposed} == NORMS
    assert {state for _, _, state in summary.decomposed} == {f"fusable (in {b} of If 'optimum::if')"
                                                             for b in ("then_branch", "else_branch")}
    result, _ = api.fuse(merged, tmp_path / "fused.onnx")
    assert result.report.count("fused", "RMSNorm") == 10 and result.report.verified
    assert sorted(r.scope for r in result.report.records if r.status == "fused") == sorted([*NORMS, *NORMS])
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    in_branches = [n.op_type for _, body in bodies(fused.graph) for n in body.node]
    assert in_branches.count("SimplifiedLayerNormalization") == 10


def test_a_merged_decoder_is_compared_profiled_and_snapshotted_against_its_folder(llama, tmp_path):
    """`use_cache_branch` comes from the cache the feeds hold; the ORT rows of the branch's nodes
    map to their modules; the If's own row is its time without its branch's nodes."""
    folder, _, merged = llama
    report = api.compare(merged, str(folder), IDS, runtimes=["ort"], layers=LayerSelection())
    assert report.passed and "present.1.value" in [c.name for c in report.outputs["ort"]]
    # every module is tapped inside the branch taken; the rotary embedding's tensor (its sin, of cos
    # and sin) is judged against the PyTorch tensor it is
    assert len(report.layers) > 25 and all(row.comparison is not None and row.comparison.passed for row in report.layers)
    assert "model.rotary_emb" in {row.module for row in report.layers} and report.first_failure["ort"] is None
    result = api.profile(merged, str(folder), IDS, runtimes=["ort"], timing=Timing(iterations=3, warmup=1, depth=3))
    rows = dict(result.rows())
    assert {"model.layers.0", "model.layers.1", "model.norm", "lm_head"} <= set(rows)
    log = result.logs["ort"]
    assert log.coverage() > 0.9 and all(rows[m]["ort"].median_ms > 0 for m in ("model.layers.0", "model.layers.1"))
    counted = sum(timings["ort"].median_ms for timings in rows.values() if "ort" in timings)
    assert counted < 1.1 * np.median(log.instrumented_ns) / 1e6  # no node's time counted twice
    api.snapshot(merged, str(folder), IDS, tmp_path / "bundle")
    drift = api.check(tmp_path / "bundle", merged)
    assert drift.passed and drift.layers_checked > 25
    assert json.loads((tmp_path / "bundle" / "manifest.json").read_text())


def test_an_if_whose_branches_disagree_is_one_line_and_nothing_is_written(llama, tmp_path):
    _, _, merged = llama
    model = onnx.load(str(merged))
    else_branch = next(a.g for a in model.graph.node[0].attribute if a.name == "else_branch")
    del else_branch.output[-1]
    onnx.save(model, str(tmp_path / "broken.onnx"))
    message = r"If node 'optimum::if' has 5 outputs but its branches give 5 \(then_branch\), 4 \(else_branch\)"
    for call in (lambda: api.inspect(tmp_path / "broken.onnx"),
                 lambda: api.fuse(tmp_path / "broken.onnx", tmp_path / "out.onnx")):
        with pytest.raises(OnnxFileError, match=message):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]


def test_norms_inside_model_local_functions_are_seen_and_fused_at_each_call(tmp_path):
    """TorchScript's export_modules_as_functions puts each LayerNorm module's ops in one local
    function: inspect counts them at each call, fuse inlines the calls (as ONNX Runtime does)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from tiny_transformer import build

    model = build().eval()
    norm = type(model.layers[0].attention_norm)
    path = tmp_path / "functions.onnx"
    torch.onnx.export(model, (torch.randint(0, 1000, (2, 16)),), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids"], export_modules_as_functions={norm})
    assert [f.name for f in onnx.load(str(path)).functions] == [norm.__name__]
    summary = api.inspect(path)
    layers = {f"layers.{i}.{n}" for i in (0, 1) for n in ("attention_norm", "output_norm")}
    assert {scope for _, scope, _ in summary.decomposed} == layers and summary.functions
    result, _ = api.fuse(path, tmp_path / "fused.onnx")
    assert result.report.count("fused") == 4 and result.report.verified
    assert "norms inside local functions: inlined" in result.report.summary()
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    assert not fused.functions and [n.op_type for n in fused.graph.node].count("LayerNormalization") == 5
    assert sorted(r.scope for r in result.report.records) == sorted(layers)
    assert api.compare(tmp_path / "fused.onnx", model, Inputs(("input_ids:2x16:int64:0..1000",))).passed


def test_an_onnx_runtime_optimized_file_runs_through_every_command(llama, tmp_path):
    """ORT's own fused ops (com.microsoft FusedMatMul, QuickGelu; SimplifiedLayerNormalization)
    count as fused, and the names ORT gives what it fused still name their modules."""
    import onnxruntime

    from ticknorm.base.scopes import ensure_scopes, get_scope

    folder, plain, _ = llama
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(str(plain), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert any(n.domain == "com.microsoft" for n in optimized.graph.node)
    summary = api.inspect(tmp_path / "optimized.onnx")
    assert summary.fused_norms == 5 and summary.decomposed_norms == 0 and summary.scope_coverage > 0.9
    norms = [n for n in ensure_scopes(optimized).graph.node if n.op_type == "SimplifiedLayerNormalization"]
    assert {get_scope(n) for n in norms} == NORMS
    result, _ = api.fuse(tmp_path / "optimized.onnx", tmp_path / "fused.onnx")
    assert result.report.count("fused") == 0 and (tmp_path / "fused.onnx").exists()
    assert api.compare(tmp_path / "optimized.onnx", str(folder), IDS, runtimes=["ort"]).passed
    rows = dict(api.profile(tmp_path / "optimized.onnx", str(folder), IDS, runtimes=["ort"],
                            timing=Timing(iterations=2, warmup=0, depth=3)).rows())
    assert set(rows) <= {"(root)", "model", "model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1",
                         "model.norm", "lm_head"}


def test_a_graph_output_that_maps_to_no_model_output_is_named(llama, tmp_path):
    from ticknorm.base.errors import InputSpecError

    folder, plain, _ = llama
    model = onnx.load(str(plain))
    for node in model.graph.node:
        node.output[:] = ["scores" if name == "logits" else name for name in node.output]
    model.graph.output[0].name = "scores"
    onnx.save(model, str(tmp_path / "renamed.onnx"))
    with pytest.raises(InputSpecError, match="output scores maps to no output of the model, whose logits the graph"):
        api.compare(tmp_path / "renamed.onnx", str(folder), IDS, runtimes=["ort"])


@pytest.fixture(scope="module")
def genai(tmp_path_factory):
    """ONNX Runtime GenAI's model builder run on a tiny Llama's folder (head size 16: its CPU
    GroupQueryAttention needs a multiple of 16; a word-level tokenizer, which the builder saves)."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (its model builder) is not installed")
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("genai")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).eval().save_pretrained(folder / "hf")
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t3").save_pretrained(folder / "hf")
    built = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", "LlamaForCausalLM",
                            "-i", str(folder / "hf"), "-o", str(folder / "out"), "-p", "fp32", "-e", "cpu",
                            "-c", str(folder / "cache")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    return folder / "hf", folder / "out" / "model.onnx"


def test_a_genai_builder_file_is_inspected_fused_compared_and_profiled(genai, tmp_path):
    """Its norms are ORT's own (SkipSimplifiedLayerNormalization), attention is GroupQueryAttention;
    per module, each norm is judged on its output 0 (output 3 is the residual stream), and a decoder
    layer, whose residual add lives in the next layer's fused norm, is said to have no tensor of its own."""
    folder, path = genai
    summary = api.inspect(path)
    assert summary.fused_norms == 5 and summary.decomposed_norms == 0 and summary.scope_coverage == 1.0
    assert summary.op_histogram["com.microsoft::GroupQueryAttention"] == 2
    result, _ = api.fuse(path, tmp_path / "fused.onnx")
    assert result.report.count("fused") == 0 and (tmp_path / "fused.onnx").exists()
    ids = Inputs(("input_ids:1x4:int64:0..100",))  # GroupQueryAttention on CPU: batch 1 for a step after a past
    report = api.compare(path, str(folder), ids, runtimes=["ort"], layers=LayerSelection())
    assert all(c.passed for c in report.outputs["ort"] if c.name.startswith("present."))
    rows = {row.module: row for row in report.layers}
    norms = [m for m in rows if m.endswith("layernorm")]
    assert len(norms) == 4 and all(rows[m].comparison.passed for m in norms)
    assert all("no tensor of its own" in rows[f"model.layers.{i}"].note for i in (0, 1))
    timed = dict(api.profile(path, str(folder), ids, runtimes=["ort"], timing=Timing(iterations=2, warmup=0, depth=3)).rows())
    assert {"model.layers.0", "model.layers.1", "lm_head"} <= set(timed)


@pytest.mark.parametrize("architecture", ["T5ForConditionalGeneration", "BartModel"])
def test_an_encoder_decoders_decoder_files_run_against_its_folder(architecture, tmp_path):
    """Optimum's seq2seq decoder files (decoder_with_past and the merged one): decoder tokens as
    input_ids, the encoder's states given, the cache of both attentions; compare computes the
    encoder's states and a real cache from the folder's model, and judges every module."""
    model = build(architecture)
    model.save_pretrained(tmp_path / "hf")
    plain = plain_decoder(model, tmp_path / "decoder_with_past.onnx")
    merged = merged_decoder(model, tmp_path / "decoder_model_merged.onnx")
    names = [i.name for i in onnx.load(str(plain)).graph.input]
    assert names[:3] == ["input_ids", "encoder_hidden_states", "encoder_attention_mask"]
    assert "past_key_values.1.encoder.value" in names
    for path in (plain, merged):
        summary = api.inspect(path)
        assert summary.scope_coverage > 0.9 and summary.decomposed_norms + summary.fused_norms > 0
        result, _ = api.fuse(path, tmp_path / "fused.onnx")  # verified on feeds derived from the graph alone
        assert result.report.count("fused") == summary.decomposed_norms and result.report.verified == bool(
            summary.decomposed_norms)
        report = api.compare(tmp_path / "fused.onnx", str(tmp_path / "hf"), IDS, runtimes=["ort"],
                             layers=LayerSelection())
        assert report.passed and report.first_failure["ort"] is None and len(report.layers) > 10
        assert "present.1.encoder.key" in [c.name for c in report.outputs["ort"]]
