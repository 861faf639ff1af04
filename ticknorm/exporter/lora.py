"""LoRA / PEFT fine-tunes: merge the adapter into its base model before export.

A deployed LoRA model is its base with `W + (alpha / r) * B @ A` folded into each adapted weight;
exporting the PEFT wrapper instead would put the low-rank branch in the graph as extra MatMuls and
put `base_model.model.` in front of every module scope. PEFT itself does the merge
(`merge_and_unload`), so every LoRA variant it knows (scaling, rank patterns, DoRA) merges as it
would in the user's own training code; ticknorm only checks that the adapter fits the base.
"""

import re
from pathlib import Path

from ticknorm.base.optional import require
from ticknorm.base.errors import CheckpointError, first_line

PEFT_PREFIX = "base_model.model."
# A trained copy of a whole module (`modules_to_save`, a classifier's head) is the adapter's too
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector",
                 ".modules_to_save.")
# The adapter's name after a LoRA weight's own (`lora_A.default.weight`), as `PeftModel.state_dict()` has it
_ADAPTER_NAME = re.compile(r"(\.lora_[A-Za-z_]+)\.(?!(?:weight|bias)$)[^.]+(?=\.|$)")
# `head.modules_to_save.default.weight`: the trained copy, which save_pretrained writes as `head.weight`
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")


def merge_adapter(model, directory):
    """`model` with the PEFT adapter saved in `directory` (`save_pretrained`) merged into it."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise CheckpointError(f"{directory} is not a PEFT adapter folder (no adapter_config.json); save the "
                              "adapter with model.save_pretrained(DIR) on the PeftModel")
    peft = require("peft", "peft")
    what = f"the adapter in {directory}"
    try:
        config = peft.PeftConfig.from_pretrained(str(directory))
        weights = peft.utils.load_peft_weights(str(directory), device="cpu")
    except Exception as exc:  # noqa: BLE001 - peft reports a foreign adapter in many ways
        raise CheckpointError(f"{what} does not fit {type(model).__name__}: {first_line(exc)}") from exc
    return _merged(model, config, weights, what)


def merge_lora_weights(model, weights: dict, config_file: Path, source: str):
    """`model` with the LoRA weights of a PEFT-wrapped model's state dict (`split_lora_state_dict`)
    merged into it, scaled as the adapter config of the training says."""
    peft = require("peft", "peft")
    try:
        attributes = peft.PeftConfig.from_json_file(str(config_file))
        config = peft.PeftConfig.from_peft_type(**peft.PeftConfig.check_kwargs(**attributes))
    except Exception as exc:  # noqa: BLE001 - a foreign or damaged JSON file fails in many ways
        raise CheckpointError(f"{config_file} is not a readable PEFT adapter config ({first_line(exc)})") from exc
    return _merged(model, config, weights, f"the LoRA weights in {source}")


def _merged(model, config, weights: dict, what: str):
    """PEFT wraps `model` as `config` says, takes `weights` (keys as `save_pretrained` writes them)
    and merges them: every weight the adapter's modules hold must be there, and none besides."""
    peft = require("peft", "peft")
    try:
        wrapped = peft.get_peft_model(model, config)
        result = peft.set_peft_model_state_dict(wrapped, weights)
    except Exception as exc:  # noqa: BLE001 - peft reports a foreign adapter in many ways
        raise CheckpointError(f"{what} does not fit {type(model).__name__}: {first_line(exc)}") from exc
    unexpected = sorted(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"{what} has weights for modules {type(model).__name__} lacks: {listing(unexpected)}")
    missing = sorted(key for key in getattr(result, "missing_keys", []) or [] if _is_lora(key))
    if missing:
        raise CheckpointError(f"{what} lacks LoRA weights the adapter config asks for: {listing(missing)}")
    return wrapped.merge_and_unload().eval()


def listing(keys: list, limit: int = 8) -> str:
    """Names for a one-line error: the first `limit`, and how many more."""
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def is_peft_state_dict(state_dict: dict) -> bool:
    return bool(state_dict) and all(key.startswith(PEFT_PREFIX) for key in state_dict)


def unwrap_peft_state_dict(state_dict: dict, source: str) -> dict:
    """A state dict saved from a PEFT-wrapped model: without LoRA weights (a merged model saved
    while wrapped) it is the base's under a prefix; with them, the scaling alpha/r the merge needs
    is not in the file, so it is refused with the ways to merge it."""
    lora = [key for key in state_dict if _is_lora(key)]
    if lora:
        raise _without_scaling(source, lora)
    return {key[len(PEFT_PREFIX):].replace(".base_layer.", "."): value for key, value in state_dict.items()}


def split_lora_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """The base model's weights and the LoRA weights of a state dict saved from a PEFT-wrapped
    model (`torch.save(peft_model.state_dict())`): the base's under their own names (PEFT's
    `base_model.model.`, `base_layer.` and `original_module.` taken off), the LoRA weights and
    trained module copies as `save_pretrained` names them (no adapter name: `...q_proj.lora_A.weight`,
    `score.weight`), which is what PEFT loads. A state dict
    without LoRA weights is returned whole, as the base's."""
    if not any(_is_lora(key) for key in state_dict):
        return state_dict, {}
    base, adapter = {}, {}
    for key, value in state_dict.items():
        plain = key.removeprefix(PEFT_PREFIX)
        if _is_lora(key):
            adapter[PEFT_PREFIX + _SAVED_COPY.sub(".", _ADAPTER_NAME.sub(r"\1", plain))] = value
        else:
            base[plain.replace(".base_layer.", ".").replace(".original_module.", ".")] = value
    return base, adapter


def adapter_config_file(checkpoint, given, lora_weights: dict, source: str) -> Path | None:
    """The adapter config that scales a checkpoint's LoRA weights: the one given, else the
    `adapter_config.json` beside the checkpoint; None for a checkpoint without LoRA weights."""
    if given is not None:
        if not lora_weights:
            raise CheckpointError(f"{source} holds no LoRA weights for --adapter-config {given} to scale; drop "
                                  "--adapter-config")
        if not Path(given).is_file():
            raise CheckpointError(f"adapter config not found: {given}")
        return Path(given)
    beside = Path(checkpoint).parent / "adapter_config.json"
    if lora_weights and not beside.is_file():
        raise _without_scaling(source, sorted(lora_weights))
    return beside if lora_weights else None


def _without_scaling(source: str, lora: list) -> CheckpointError:
    """The refusal with every way out that applies: --adapter-config merges a one-file state dict
    only (a sharded checkpoint is copied in shard by shard, never held whole to merge)."""
    config = ("" if source.endswith(".index.json") else "Give the adapter_config.json of the training with "
              "--adapter-config FILE (or put it beside the checkpoint), or s")
    return CheckpointError(
        f"{source} is the state dict of a PEFT-wrapped model with {len(lora)} LoRA weights ({lora[0]}, ...); their "
        f"scaling (lora_alpha / r) is not in it. {config or 'S'}ave the adapter with peft_model.save_pretrained(DIR) "
        "and pass --adapter DIR with the base model, or merge first: "
        "torch.save(peft_model.merge_and_unload().state_dict(), PATH)")


def _is_lora(key: str) -> bool:
    return any(marker in key for marker in _LORA_MARKERS)
