"""Checkpoints, factories and Hugging Face directories, loaded for real."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ticknorm.base.errors import CheckpointError
from ticknorm.exporter.load import build_model, load_factory, load_hf_directory

FACTORY = "tests/factories.py:small"


def _weights():
    torch.manual_seed(3)
    return build_model(FACTORY).state_dict()


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd},
    lambda sd: {f"module.{k}": v for k, v in sd.items()},
], ids=["plain", "state_dict-wrapper", "model-wrapper", "ddp-prefix"])
def test_state_dict_checkpoints_load_into_the_factory_model(tmp_path, wrap):
    weights = _weights()
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(weights), path)
    model = build_model(FACTORY, path)
    assert not model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name])


def test_safetensors_checkpoint_loads(tmp_path):
    weights = _weights()
    save_file(weights, tmp_path / "w.safetensors")
    model = build_model(FACTORY, tmp_path / "w.safetensors")
    assert torch.equal(model.state_dict()["proj.weight"], weights["proj.weight"])


def test_key_mismatch_lists_missing_unexpected_and_wrong_shape(tmp_path):
    weights = _weights()
    weights.pop("norm.bias")
    weights["extra.weight"] = torch.zeros(2)
    weights["proj.weight"] = torch.zeros(3, 3)
    torch.save(weights, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as error:
        build_model(FACTORY, tmp_path / "bad.pt")
    message = str(error.value)
    assert "missing: norm.bias" in message
    assert "unexpected: extra.weight" in message
    assert "wrong shape: proj.weight (3, 3) vs model (8, 8)" in message


def test_pickled_whole_model_needs_trust_pickle(tmp_path):
    model = build_model(FACTORY)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        build_model(FACTORY, tmp_path / "whole.pt")
    loaded = build_model(FACTORY, tmp_path / "whole.pt", trust_pickle=True)
    assert isinstance(loaded, nn.Module) and not loaded.training


def test_torchscript_archive_needs_trust_pickle(tmp_path):
    scripted = torch.jit.trace(build_model(FACTORY), torch.randn(2, 8))
    scripted.save(str(tmp_path / "model.ts"))
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        build_model(FACTORY, tmp_path / "model.ts")
    assert build_model(FACTORY, tmp_path / "model.ts", trust_pickle=True)(torch.randn(2, 8)).shape == (2, 8)


@pytest.mark.parametrize("content, match", [(b"not a checkpoint", "not a readable PyTorch checkpoint")])
def test_corrupt_checkpoint_is_one_clear_error(tmp_path, content, match):
    (tmp_path / "c.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        build_model(FACTORY, tmp_path / "c.pt")
    (tmp_path / "c.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        build_model(FACTORY, tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        build_model(FACTORY, tmp_path / "missing.pt")


@pytest.mark.parametrize("reference, match", [
    ("no_colon", "expected pkg.module:function"),
    ("tests/missing.py:fn", "factory file not found"),
    ("ticknorm_no_such_module:fn", "cannot import 'ticknorm_no_such_module'"),
    ("tests/factories.py:absent", "has no callable 'absent'"),
    ("tests/factories.py:not_a_module", "not a torch.nn.Module"),
    ("tests/factories.py:broken", "factory 'tests/factories.py:broken' failed: RuntimeError"),
])
def test_bad_factories_are_named_in_the_error(reference, match):
    with pytest.raises(CheckpointError, match=match):
        build_model(reference)


def test_module_path_factories_import(monkeypatch):
    monkeypatch.syspath_prepend("tests")
    assert isinstance(load_factory("factories:small")(), nn.Module)


def test_hugging_face_directory_loads_from_disk_only(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    original = transformers.BertModel(config).eval()
    original.save_pretrained(tmp_path)
    loaded = load_hf_directory(tmp_path)
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).last_hidden_state, original(input_ids=ids).last_hidden_state)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_directory(tmp_path / "nothing")
