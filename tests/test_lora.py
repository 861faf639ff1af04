"""LoRA fine-tunes: a PEFT adapter folder merged into its base before export, and PEFT-wrapped
state dicts recognised."""

import numpy as np
import onnx
import pytest
import torch

from conftest import ort_run
from ticknorm import Inputs, ModelRef, api
from ticknorm.base.errors import CheckpointError

peft = pytest.importorskip("peft")
from hf_models import build  # noqa: E402
from factories import Small  # noqa: E402

IDS = Inputs(("input_ids:2x8:int64:0..128",))


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory):
    """A base folder, an adapter folder with trained (non-zero) LoRA weights, and the PEFT model."""
    root = tmp_path_factory.mktemp("lora")
    build("LlamaForCausalLM").save_pretrained(root / "base")
    tuned = peft.get_peft_model(build("LlamaForCausalLM"), peft.LoraConfig(r=4, lora_alpha=8,
                                                                            target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, parameter in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)  # peft starts B at zero: an untrained adapter changes nothing
    tuned.save_pretrained(root / "adapter")
    return root, tuned.eval()


def test_adapter_is_merged_before_export(fine_tune, tmp_path):
    root, tuned = fine_tune
    result = api.export(ModelRef(str(root / "base"), adapter=str(root / "adapter")), IDS, tmp_path / "m.onnx")
    assert result.passed
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert not any("lora" in n.name.lower() for n in model.graph.node)  # folded into the weights
    ids = np.random.default_rng(0).integers(0, 128, (2, 8))
    got = ort_run(model, {"input_ids": ids, "attention_mask": np.ones((2, 8), np.int64)})["logits"]
    with torch.no_grad():
        adapted = tuned(input_ids=torch.from_numpy(ids)).logits.numpy()  # PEFT's own, unmerged forward
        base = build("LlamaForCausalLM")(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, adapted, atol=1e-4, rtol=1e-3)
    assert np.abs(got - base).max() > 1e-2  # the adapter did change the model


def test_compare_merges_the_same_adapter(fine_tune, tmp_path):
    root, _ = fine_tune
    api.export(ModelRef(str(root / "base"), adapter=str(root / "adapter")), IDS, tmp_path / "m.onnx")
    merged = api.compare(tmp_path / "m.onnx", ModelRef(str(root / "base"), adapter=str(root / "adapter")), IDS)
    plain = api.compare(tmp_path / "m.onnx", str(root / "base"), IDS)
    assert merged.passed and not plain.passed


def test_peft_wrapped_state_dict_with_lora_weights_says_how_to_merge(tmp_path):
    wrapped = peft.get_peft_model(Small(), peft.LoraConfig(r=2, target_modules=["proj"]))
    torch.save(wrapped.state_dict(), tmp_path / "wrapped.pt")
    with pytest.raises(CheckpointError, match=r"PEFT-wrapped model with 2 LoRA weights .*--adapter DIR.*merge_and_unload"):
        api.export(ModelRef("tests/factories.py:small", tmp_path / "wrapped.pt"), Inputs(("x:2x8",)), tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrapped.pt"]


def test_peft_prefixed_state_dict_without_lora_weights_loads(tmp_path):
    torch.manual_seed(3)
    trained = Small()
    torch.save({f"base_model.model.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "merged.pt")
    module = ModelRef("tests/factories.py:small", tmp_path / "merged.pt").load()
    assert torch.equal(module.proj.weight, trained.proj.weight)


def test_bad_adapter_folders_are_one_clear_error(fine_tune, tmp_path):
    root, _ = fine_tune
    with pytest.raises(CheckpointError, match="is not a PEFT adapter folder"):
        api.export(ModelRef(str(root / "base"), adapter=str(tmp_path)), IDS, tmp_path / "m.onnx")
    foreign = peft.get_peft_model(Small(), peft.LoraConfig(r=2, target_modules=["proj"]))
    foreign.save_pretrained(tmp_path / "foreign")
    with pytest.raises(CheckpointError, match="does not fit LlamaForCausalLM"):
        api.export(ModelRef(str(root / "base"), adapter=str(tmp_path / "foreign")), IDS, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
