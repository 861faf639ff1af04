"""Checkpoints as users hold them: bf16 and fp16 Hugging Face folders (what every current LLM folder
says), sharded safetensors with their index, bf16 state dicts for a factory. Each goes through
every command from the command line, judged against PyTorch in the checkpoint's own type."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ticknorm.base.errors import CheckpointError
from ticknorm.base.metrics import compare_arrays, within_own_rounding
from ticknorm.base.precision import coarser
from ticknorm.cli import main
from ticknorm.exporter.load import build_model
from ticknorm.runtime.torch_runner import module_precision

transformers = pytest.importorskip("transformers")
from hf_models import CONFIGS, build  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_transformer.py"
IDS = ["--input", "input_ids:batch=2xseq=8:int64:0..128"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def perturbed(architecture: str):
    """A tiny model whose norms all have weights of their own (random-weight configs give every
    norm ones and zeros, which an optimizer may merge)."""
    model = build(architecture)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def low_folders(tmp_path_factory):
    """Llama in bf16 (one file) and in fp16 (sharded, with model.safetensors.index.json), BERT in bf16."""
    root = tmp_path_factory.mktemp("low")
    perturbed("LlamaForCausalLM").to(torch.bfloat16).save_pretrained(root / "llama_bf16")
    perturbed("LlamaForCausalLM").to(torch.float16).save_pretrained(root / "llama_fp16", max_shard_size="40KB")
    perturbed("BertModel").to(torch.bfloat16).save_pretrained(root / "bert_bf16")
    return root


def test_the_folders_are_what_users_hold(low_folders):
    assert json.loads((low_folders / "llama_bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((low_folders / "llama_fp16" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("folder,dtype", [("llama_bf16", "bfloat16"), ("llama_fp16", "float16"),
                                          ("bert_bf16", "bfloat16")])
def test_export_writes_fp32_and_judges_against_the_checkpoints_type(folder, dtype, low_folders, tmp_path):
    result = run("export", "--model", low_folders / folder, *IDS, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert "graph precision: fp32 (the default" in result.output and f"the checkpoint is {dtype}" in result.output
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert {t.data_type for t in model.graph.initializer if t.data_type in (1, 10, 16)} == {onnx.TensorProto.FLOAT}
    tight = [line for line in result.output.splitlines() if "ok (atol 0.0001, rtol 0.001)" in line]
    own = [line for line in result.output.splitlines() if f"(vs PyTorch {dtype})" in line]
    assert tight and own and all("ok (atol 0.2" in line or "ok (atol 0.02" in line for line in own)


def test_export_with_past_of_a_bf16_folder_checks_every_step(low_folders, tmp_path):
    result = run("export", "--model", low_folders / "llama_bf16", *IDS, "-o", tmp_path / "m.onnx",
                 "--task", "text-generation-with-past")
    assert result.exit_code == 0, result.output
    assert "logits (decode 2, vs PyTorch bfloat16)" in result.output


def test_bf16_precision_keeps_the_checkpoints_weights_exactly(low_folders, tmp_path):
    """bf16 -> fp32 -> bf16 loses nothing: the bf16 graph holds the checkpoint's own numbers."""
    result = run("export", "--model", low_folders / "llama_bf16", *IDS, "-o", tmp_path / "m.onnx", "--precision", "bf16")
    assert result.exit_code == 0, result.output
    assert "graph precision: bf16 (--precision)" in result.output
    graph = onnx.load(str(tmp_path / "m.onnx"))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    saved = transformers.AutoModelForCausalLM.from_pretrained(low_folders / "llama_bf16").state_dict()
    name = "model.embed_tokens.weight"
    assert weights[name].dtype.name == "bfloat16"
    assert np.array_equal(weights[name].astype(np.float32), saved[name].float().numpy())


def test_every_command_takes_a_bf16_folder(low_folders, tmp_path):
    folder = low_folders / "llama_bf16"
    onnx_file = tmp_path / "m.onnx"
    assert run("export", "--model", folder, *IDS, "-o", onnx_file).exit_code == 0
    compared = run("compare", onnx_file, "--model", folder, *IDS, "--per-layer")
    assert compared.exit_code == 0, compared.output
    assert "ort vs torch in bfloat16 (the checkpoint's type) (atol 0.2, rtol 0.2):" in compared.output
    profiled = run("profile", onnx_file, "--model", folder, *IDS, "--runtime", "torch,ort", "--iterations", "3")
    assert profiled.exit_code == 0, profiled.output
    reported = run("report", onnx_file, "--model", folder, *IDS, "-o", tmp_path / "r.html", "--iterations", "3")
    assert reported.exit_code == 0, reported.output
    bundle = tmp_path / "bundle"
    assert run("drift", "snapshot", onnx_file, "--model", folder, *IDS, "-o", bundle).exit_code == 0
    assert json.loads((bundle / "bundle.json").read_text())["reference_precision"] == "bf16"
    checked = run("drift", "check", bundle, onnx_file)
    assert checked.exit_code == 0, checked.output
    converted = run("convert", onnx_file, "-o", tmp_path / "c.onnx", "--precision", "fp16")
    assert converted.exit_code == 0, converted.output


def test_a_compare_with_a_planted_error_fails_at_the_checkpoints_tolerance(low_folders, tmp_path):
    """The bf16 bar is loose, not absent: a graph whose logits are off by 1 fails against it."""
    folder = low_folders / "llama_bf16"
    assert run("export", "--model", folder, *IDS, "-o", tmp_path / "m.onnx").exit_code == 0
    model = onnx.load(str(tmp_path / "m.onnx"))
    logits = model.graph.output[0].name
    model.graph.node.append(onnx.helper.make_node("Add", [f"{logits}_raw", "one"], [logits]))
    for node in model.graph.node[:-1]:
        node.output[:] = [f"{logits}_raw" if o == logits else o for o in node.output]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    onnx.save(model, str(tmp_path / "planted.onnx"))
    result = run("compare", tmp_path / "planted.onnx", "--model", folder, *IDS)
    assert result.exit_code == 1 and "FAIL" in result.output


@pytest.fixture(scope="module")
def factory_checkpoints(tmp_path_factory):
    """The tiny example's weights in bf16: one file, and two shards with their index (plus an index
    naming a shard outside its folder, and one naming a shard that is missing)."""
    root = tmp_path_factory.mktemp("shards")
    model = build_model(f"{EXAMPLE}:build", EXAMPLE.with_suffix(".safetensors"))
    state = {key: value.to(torch.bfloat16).contiguous() for key, value in model.state_dict().items()}
    save_file(state, root / "model_bf16.safetensors")
    keys = list(state)
    (root / "sharded").mkdir()
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
    for shard, names in halves.items():
        save_file({key: state[key] for key in names}, root / "sharded" / shard)
    weight_map = {key: shard for shard, names in halves.items() for key in names}
    (root / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    outside = {key: "../model_bf16.safetensors" for key in keys}
    (root / "sharded" / "outside.index.json").write_text(json.dumps({"weight_map": outside}))
    (root / "sharded" / "missing.index.json").write_text(json.dumps({"weight_map": {**weight_map, keys[0]: "c.safetensors"}}))
    return root


def test_a_bf16_state_dict_runs_the_factorys_model_in_bf16(factory_checkpoints):
    model = build_model(f"{EXAMPLE}:build", factory_checkpoints / "model_bf16.safetensors")
    assert module_precision(model) == "bf16"


def test_a_sharded_checkpoint_loads_the_same_weights_as_one_file(factory_checkpoints):
    whole = build_model(f"{EXAMPLE}:build", factory_checkpoints / "model_bf16.safetensors")
    sharded = build_model(f"{EXAMPLE}:build", factory_checkpoints / "sharded" / "model.safetensors.index.json")
    for (name, a), (_, b) in zip(whole.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_sharded_checkpoint_exports_from_the_command_line(factory_checkpoints, tmp_path):
    result = run("export", "--model", f"{EXAMPLE}:build", "--checkpoint",
                 factory_checkpoints / "sharded" / "model.safetensors.index.json",
                 "--input", "input_ids:batch=2xseq=16:int64:0..1000", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert "the checkpoint is bfloat16" in result.output


@pytest.mark.parametrize("index,message", [("outside.index.json", "weights outside the model's folder are refused"),
                                           ("missing.index.json", "names shards that are not there")])
def test_a_bad_index_is_one_line_and_nothing_is_written(index, message, factory_checkpoints, tmp_path):
    result = run("export", "--model", f"{EXAMPLE}:build", "--checkpoint", factory_checkpoints / "sharded" / index,
                 "--input", "input_ids:batch=2xseq=16:int64:0..1000", "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_a_sharded_checkpoint_that_does_not_fit_names_its_keys(factory_checkpoints, tmp_path):
    index = json.loads((factory_checkpoints / "sharded" / "model.safetensors.index.json").read_text())
    folder = tmp_path / "renamed"
    folder.mkdir()
    for shard in set(index["weight_map"].values()):
        shutil.copyfile(factory_checkpoints / "sharded" / shard, folder / shard)
    first = next(iter(index["weight_map"]))
    index["weight_map"][f"{first}.extra"] = index["weight_map"][first]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"lacks .*\.extra"):
        build_model(f"{EXAMPLE}:build", folder / "model.safetensors.index.json")


def test_coarser_picks_the_looser_type():
    assert coarser("fp32", "bf16") == "bf16" and coarser("fp16", "fp32") == "fp16" and coarser("fp16", "bf16") == "bf16"


def test_a_graph_past_the_types_bar_passes_only_within_the_types_own_rounding():
    """Against a bf16 checkpoint's PyTorch, a value past bf16's bar passes when the model's exact
    fp32 upcast is as far from it (the type's rounding, accumulated over a deep model), not when
    the graph is farther than that."""
    own = np.array([1.0, 2.0, -3.0], np.float32)
    upcast = own + np.array([0.5, -0.4, 0.0], np.float32)  # bf16's own rounding, past its 0.2 + 0.2*|ref| bar
    found = compare_arrays("logits", own, upcast, 0.2, 0.2)
    assert not found.passed
    judged = within_own_rounding(found, own, upcast, upcast + 1e-6, "bfloat16")
    assert judged.passed and "bfloat16's own rounding" in judged.line()
    farther = upcast + np.array([0.0, 0.0, 1.0], np.float32)
    worse = compare_arrays("logits", own, farther, 0.2, 0.2)
    assert not within_own_rounding(worse, own, upcast, farther, "bfloat16").passed


def test_a_bf16_graph_is_checked_upcast_on_the_cpu_and_not_timed_there(low_folders, tmp_path):
    """ONNX Runtime's CPU provider has no bf16 MatMul: compare and drift check run the graph's fp32
    emulation (never NOT_IMPLEMENTED); profile refuses to time that emulation as if it were bf16.
    PyTorch in bf16 keeps the graph's fp32 islands (an attention) in fp32, keywords and all."""
    folder = low_folders / "llama_bf16"
    onnx_file = tmp_path / "m.onnx"
    assert run("export", "--model", folder, *IDS, "-o", onnx_file, "--precision", "bf16").exit_code == 0
    compared = run("compare", onnx_file, "--model", folder, *IDS, "--runtime", "ort,torch-bf16", "--per-layer")
    assert compared.exit_code == 0, compared.output
    assert "NOT_IMPLEMENTED" not in compared.output and "torch-bf16 vs" in compared.output
    bundle = tmp_path / "bundle"
    assert run("drift", "snapshot", onnx_file, "--model", folder, *IDS, "-o", bundle).exit_code == 0
    assert run("drift", "check", bundle, onnx_file).exit_code == 0
    profiled = run("profile", onnx_file, "--model", folder, *IDS, "--runtime", "ort", "--iterations", "2")
    assert profiled.exit_code == 2 and "timing the graph's fp32 emulation" in profiled.output


def _every_command(folder, specs: list, tmp_path) -> None:
    """export, compare (per layer), profile, report, drift snapshot and check, convert: each exits 0.
    (convert completes no partial --input: a decoder's attention_mask is given to it.)"""
    inputs = [arg for spec in specs for arg in ("--input", spec)]
    mask = ["--input", "attention_mask:batch=2xseq=8:int64:1..2"] if any(s.startswith("input_ids") for s in specs) else []
    onnx_file = tmp_path / "m.onnx"
    commands = [("export", "--model", folder, *inputs, "-o", onnx_file),
                ("compare", onnx_file, "--model", folder, *inputs, "--per-layer"),
                ("profile", onnx_file, "--model", folder, *inputs, "--runtime", "torch,ort", "--iterations", "2"),
                ("report", onnx_file, "--model", folder, *inputs, "-o", tmp_path / "r.html", "--iterations", "2"),
                ("drift", "snapshot", onnx_file, "--model", folder, *inputs, "-o", tmp_path / "bundle"),
                ("drift", "check", tmp_path / "bundle", onnx_file),
                ("convert", onnx_file, "-o", tmp_path / "c.onnx", "--precision", "fp16", *inputs, *mask)]
    for command in commands:
        result = run(*command)
        assert result.exit_code == 0, (command[0], result.output)


@pytest.mark.parametrize("architecture", ["MixtralForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM",
                                          "Wav2Vec2Model"])
def test_moe_and_audio_models_go_through_every_command(architecture, tmp_path):
    folder = tmp_path / "model"
    perturbed(architecture).to(torch.bfloat16).save_pretrained(folder)
    specs = [spec.replace("int64", "int64:0..128") for spec in CONFIGS[architecture][1]]
    _every_command(folder, specs, tmp_path)
