"""What an exported graph serves, in Optimum's task names; no torch needed to name or read one."""

import re

DEFAULT = "default"
WITH_PAST = "text-generation-with-past"
TASKS = (DEFAULT, WITH_PAST)
PAST_INPUT = re.compile(r"past_key_values\.(\d+)\.(key|value)")


def task_of_graph(input_names) -> str:
    """The task an exported graph serves, read from its inputs (compare and drift need no --task)."""
    return WITH_PAST if any(PAST_INPUT.fullmatch(name) for name in input_names) else DEFAULT
