"""LoRA / PEFT fine-tunes: merge the adapter into its base model before export.

A deployed LoRA model is its base with `W + (alpha / r) * B @ A` folded into each adapted weight;
exporting the PEFT wrapper instead would put the low-rank branch in the graph as extra MatMuls and
put `base_model.model.` in front of every module scope. PEFT itself does the merge
(`merge_and_unload`), so every LoRA variant it knows (scaling, rank patterns, DoRA) merges as it
would in the user's own training code; ticknorm only checks that the adapter fits the base.
"""

from pathlib import Path

from ticknorm.base.optional import require
from ticknorm.base.errors import CheckpointError, first_line

PEFT_PREFIX = "base_model.model."
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


def merge_adapter(model, directory):
    """`model` with the PEFT adapter saved in `directory` (`save_pretrained`) merged into it."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise CheckpointError(f"{directory} is not a PEFT adapter folder (no adapter_config.json); save the "
                              "adapter with model.save_pretrained(DIR) on the PeftModel")
    peft = require("peft", "peft")
    try:
        config = peft.PeftConfig.from_pretrained(str(directory))
        wrapped = peft.get_peft_model(model, config)
        result = peft.set_peft_model_state_dict(wrapped, peft.utils.load_peft_weights(str(directory), device="cpu"))
    except Exception as exc:  # noqa: BLE001 - peft reports a foreign adapter in many ways
        raise CheckpointError(f"the adapter in {directory} does not fit {type(model).__name__}: "
                              f"{first_line(exc)}") from exc
    unexpected = sorted(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        more = f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""
        raise CheckpointError(f"the adapter in {directory} has weights for modules {type(model).__name__} lacks: "
                              + ", ".join(unexpected[:4]) + more)
    return wrapped.merge_and_unload().eval()


def is_peft_state_dict(state_dict: dict) -> bool:
    return bool(state_dict) and all(key.startswith(PEFT_PREFIX) for key in state_dict)


def unwrap_peft_state_dict(state_dict: dict, source: str) -> dict:
    """A state dict saved from a PEFT-wrapped model: without LoRA weights (a merged model saved
    while wrapped) it is the base's under a prefix; with them, the scaling alpha/r the merge needs
    is not in the file, so it is refused with the two ways to merge it."""
    lora = [key for key in state_dict if any(marker in key for marker in _LORA_MARKERS)]
    if lora:
        raise CheckpointError(f"{source} is the state dict of a PEFT-wrapped model with {len(lora)} LoRA weights "
                              f"({lora[0]}, ...); their scaling (lora_alpha / r) is not in it. Save the adapter with "
                              "peft_model.save_pretrained(DIR) and pass --adapter DIR with the base model, or merge "
                              "first: torch.save(peft_model.merge_and_unload().state_dict(), PATH)")
    return {key[len(PEFT_PREFIX):].replace(".base_layer.", "."): value for key, value in state_dict.items()}
