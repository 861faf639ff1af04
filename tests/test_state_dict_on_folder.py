"""A fine-tuned state dict on a Hugging Face base folder (`--model HF_DIR --checkpoint FILE`): the
folder's architecture and config, the checkpoint's weights, as a custom training loop saves them
(plain, DDP, PEFT-wrapped with LoRA weights merged at the adapter's scaling)."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file, save_model

from conftest import ort_run
from hf_models import build
from ticknorm import ModelRef
from ticknorm.base.errors import CheckpointError, InputSpecError
from ticknorm.cli import main

IDS = "input_ids:2x8:int64:0..128"
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama saved as a bf16 `save_pretrained` folder: the base a fine-tune started from."""
    folder = tmp_path_factory.mktemp("base") / "llama"
    build("LlamaForCausalLM").to(torch.bfloat16).save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


def fine_tuned(seed: int = 5):
    """The base in fp32 with every weight moved (what training leaves)."""
    model = build("LlamaForCausalLM").to(torch.bfloat16).float()
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def loaded(ref: ModelRef):
    return ref.load().hf


def assert_weights_equal(model, expected: dict):
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("file, wrap", [("tuned.pt", ""), ("tuned.pth", "module."), ("tuned.bin", "_orig_mod."),
                                         ("tuned.safetensors", ""), ("ddp.safetensors", "module.")])
def test_state_dict_replaces_the_folders_weights(base_dir, tmp_path, file, wrap):
    tuned = fine_tuned()
    state = {wrap + name: tensor for name, tensor in tuned.state_dict().items()}
    path = tmp_path / file
    save_file(state, path) if file.endswith(".safetensors") else torch.save(state, path)
    model = loaded(ModelRef(str(base_dir), str(path)))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert_weights_equal(model, tuned.state_dict())  # fp32, as the checkpoint: not the folder's bf16


def test_bf16_state_dict_runs_in_bf16_and_peft_prefix_is_taken_off(base_dir, tmp_path):
    tuned = fine_tuned().to(torch.bfloat16)
    torch.save({f"base_model.model.{k}": v for k, v in tuned.state_dict().items()}, tmp_path / "merged.pt")
    model = loaded(ModelRef(str(base_dir), str(tmp_path / "merged.pt")))
    assert_weights_equal(model, tuned.state_dict())


def test_tied_weight_saved_once_reads_from_its_twin(tmp_path):
    gpt2 = build("GPT2LMHeadModel")
    gpt2.save_pretrained(tmp_path / "gpt2")
    tuned = build("GPT2LMHeadModel", seed=3)
    save_model(tuned, str(tmp_path / "tuned.safetensors"))  # keeps one of the tied embedding and head
    model = loaded(ModelRef(str(tmp_path / "gpt2"), str(tmp_path / "tuned.safetensors")))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_weights_equal(model, tuned.state_dict())


def test_missing_and_unexpected_keys_are_named(base_dir, tmp_path):
    state = fine_tuned().state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.1.mlp.adapter.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial.pt does not fit the model; missing: model.layers.1.mlp.up_proj"
                                              r".weight; unexpected: model.layers.1.mlp.adapter.weight"):
        ModelRef(str(base_dir), str(tmp_path / "partial.pt")).load()


def test_a_folder_without_config_is_refused(tmp_path):
    torch.save(fine_tuned().state_dict(), tmp_path / "tuned.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="is not a Hugging Face model directory"):
        ModelRef(str(tmp_path / "folder"), str(tmp_path / "tuned.pt")).load()


def lora_fine_tune(peft, **config):
    """A PEFT-wrapped fine-tune of the base, with trained (non-zero) LoRA B and moved base weights."""
    wrapped = peft.get_peft_model(fine_tuned(), peft.LoraConfig(target_modules=TARGETS, **config))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.normal_(std=0.5)  # peft starts B at zero: an untrained adapter changes nothing
    return wrapped.eval()


def peft_merged(peft, wrapped, state: dict) -> dict:
    """PEFT's own merge_and_unload of the same weights (a fresh wrapper, loaded with `state`)."""
    dtype = next(iter(state.values())).dtype
    again = peft.get_peft_model(fine_tuned(seed=99).to(dtype), wrapped.peft_config["default"])
    again.load_state_dict(state, strict=True)
    return again.merge_and_unload().state_dict()


@pytest.mark.parametrize("config, beside", [(dict(r=4, lora_alpha=8), True), (dict(r=4, lora_alpha=8), False),
                                            (dict(r=4, lora_alpha=16, rank_pattern={"v_proj": 2},
                                                  alpha_pattern={"layers.1.self_attn.q_proj": 3}), True),
                                            (dict(r=4, lora_alpha=8, modules_to_save=["lm_head"]), True)])
def test_lora_state_dict_is_merged_as_peft_merges_it(base_dir, tmp_path, config, beside):
    peft = pytest.importorskip("peft")
    wrapped = lora_fine_tune(peft, **config)
    state = wrapped.state_dict()  # base_model.model.*.base_layer.weight, *.lora_A.default.weight, ...
    (tmp_path / "run").mkdir()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "run" / "step_100.pt")  # DDP too
    wrapped.peft_config["default"].save_pretrained(str(tmp_path / ("run" if beside else "elsewhere")))
    given = None if beside else str(tmp_path / "elsewhere" / "adapter_config.json")
    model = loaded(ModelRef(str(base_dir), str(tmp_path / "run" / "step_100.pt"), adapter_config=given))
    assert not any("lora" in name for name in model.state_dict())
    expected = peft_merged(peft, wrapped, state)
    assert_weights_equal(model, expected)
    # the scaling, by hand: W + alpha / r * B @ A (alpha_pattern's 3 over r=4 on layer 1's q_proj)
    alpha, rank = (3, 4) if "alpha_pattern" in config else (8, 4)
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    by_hand = state[f"{prefix}.base_layer.weight"] + alpha / rank * (
        state[f"{prefix}.lora_B.default.weight"] @ state[f"{prefix}.lora_A.default.weight"])
    torch.testing.assert_close(model.model.layers[1].self_attn.q_proj.weight, by_hand)


def test_bf16_lora_state_dict_merges_in_bf16(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    wrapped = lora_fine_tune(peft, r=2, lora_alpha=4).to(torch.bfloat16)
    torch.save(wrapped.state_dict(), tmp_path / "tuned.pt")
    wrapped.peft_config["default"].save_pretrained(str(tmp_path))
    model = loaded(ModelRef(str(base_dir), str(tmp_path / "tuned.pt")))
    assert model.dtype == torch.bfloat16
    assert_weights_equal(model, peft_merged(peft, wrapped, wrapped.state_dict()))


def test_lora_keys_without_the_adapter_name_merge_too(base_dir, tmp_path):
    """Keys as `save_pretrained` writes LoRA weights (`...lora_A.weight`), in a safetensors file."""
    peft = pytest.importorskip("peft")
    wrapped = lora_fine_tune(peft, r=2, lora_alpha=4)
    state = {k.replace(".default.", "."): v.contiguous() for k, v in wrapped.state_dict().items()}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    save_file(state, tmp_path / "tuned.safetensors")
    wrapped.peft_config["default"].save_pretrained(str(tmp_path))
    model = loaded(ModelRef(str(base_dir), str(tmp_path / "tuned.safetensors")))
    assert_weights_equal(model, peft_merged(peft, wrapped, wrapped.state_dict()))


def test_lora_without_its_config_is_refused_with_both_ways_out(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    torch.save(lora_fine_tune(peft, r=2).state_dict(), tmp_path / "tuned.pt")
    with pytest.raises(CheckpointError, match=r"tuned.pt is the state dict of a PEFT-wrapped model with 8 LoRA weights "
                                              r".*--adapter-config FILE.*merge_and_unload"):
        ModelRef(str(base_dir), str(tmp_path / "tuned.pt")).load()


def test_lora_weights_the_config_does_not_target_are_named(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    torch.save(lora_fine_tune(peft, r=2).state_dict(), tmp_path / "tuned.pt")
    peft.LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"the LoRA weights in tuned.pt has weights for modules LlamaForCausalLM "
                                              r"lacks: .*v_proj.lora_A"):
        ModelRef(str(base_dir), str(tmp_path / "tuned.pt")).load()


def test_adapter_config_needs_lora_weights_and_a_checkpoint(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    peft.LoraConfig(r=2, target_modules=TARGETS).save_pretrained(str(tmp_path))
    config = str(tmp_path / "adapter_config.json")
    torch.save(fine_tuned().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt holds no LoRA weights .*; drop --adapter-config"):
        ModelRef(str(base_dir), str(tmp_path / "plain.pt"), adapter_config=config).load()
    with pytest.raises(InputSpecError, match="--adapter-config scales the LoRA weights of a --checkpoint"):
        ModelRef(str(base_dir), adapter_config=config).load()
    (tmp_path / "broken.json").write_text("{")
    torch.save(lora_fine_tune(peft, r=2).state_dict(), tmp_path / "lora.pt")
    with pytest.raises(CheckpointError, match="broken.json is not a readable PEFT adapter config"):
        ModelRef(str(base_dir), str(tmp_path / "lora.pt"), adapter_config=str(tmp_path / "broken.json")).load()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_export_cli_with_a_state_dict_on_a_folder(base_dir, tmp_path):
    tuned = fine_tuned()
    save_file(tuned.state_dict(), tmp_path / "tuned.safetensors")
    result = run("export", "--model", base_dir, "--checkpoint", tmp_path / "tuned.safetensors", "--input", IDS,
                 "-o", tmp_path / "m.onnx")
    assert result.exit_code == 0, result.output
    assert "PyTorch vs ONNX Runtime (CPU):" in result.output and "ok" in result.output
    ids = np.random.default_rng(0).integers(0, 128, (2, 8))
    got = ort_run(onnx.load(str(tmp_path / "m.onnx")), {"input_ids": ids, "attention_mask": np.ones((2, 8), np.int64)})
    with torch.no_grad():
        expected = tuned(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got["logits"], expected, atol=1e-4, rtol=1e-3)


def test_cli_refusals_are_one_line_exit_2(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    torch.save(lora_fine_tune(peft, r=2).state_dict(), tmp_path / "tuned.pt")
    result = run("export", "--model", base_dir, "--checkpoint", tmp_path / "tuned.pt", "--input", IDS,
                 "-o", tmp_path / "m.onnx")
    assert result.exit_code == 2
    assert "--adapter-config FILE" in result.output and "merge_and_unload" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.output and len(errors) == 1 and errors[0].endswith("state_dict(), PATH)")
    assert not (tmp_path / "m.onnx").exists()
