"""What an exported graph serves, in Optimum's task names; no torch needed to name or read one."""

import re

DEFAULT = "default"
WITH_PAST = "text-generation-with-past"
# An encoder-decoder's decoder step (Optimum's decoder_with_past_model.onnx): decoder tokens as
# `input_ids`, the encoder's `encoder_hidden_states` and `encoder_attention_mask` given, the cache of
# both attentions as `past_key_values.N.decoder.key` and `past_key_values.N.encoder.key`.
SEQ2SEQ_WITH_PAST = "text2text-generation-with-past"
TASKS = (DEFAULT, WITH_PAST, SEQ2SEQ_WITH_PAST)
PAST_INPUT = re.compile(r"past_key_values\.(\d+)\.(key|value)")
SEQ2SEQ_PAST_INPUT = re.compile(r"past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)")


def task_of_graph(input_names) -> str:
    """The task an exported graph serves, read from its inputs (compare and drift need no --task)."""
    names = list(input_names)
    if any(SEQ2SEQ_PAST_INPUT.fullmatch(name) for name in names) or "encoder_hidden_states" in names:
        return SEQ2SEQ_WITH_PAST
    return WITH_PAST if any(PAST_INPUT.fullmatch(name) for name in names) else DEFAULT
