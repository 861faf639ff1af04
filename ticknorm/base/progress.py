"""Where long work reports, passed down from whoever shows it (the CLI's stderr and bar)."""

from dataclasses import dataclass
from typing import Callable


def _silent(_message: str) -> None:
    pass


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Progress:
    step: Callable[[str], None] = _silent  # a message as each phase starts
    advance: Callable[[], None] = _nothing  # once per timed iteration (a progress bar's update)


QUIET = Progress()
