"""Where long work reports, passed down from whoever shows it (the CLI's stderr and bar)."""

import time
from dataclasses import dataclass
from collections.abc import Callable


def _silent(_message: str) -> None:
    pass


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Progress:
    step: Callable[[str], None] = _silent  # a message as each phase starts
    advance: Callable[[], None] = _nothing  # once per timed iteration (a progress bar's update)


QUIET = Progress()


class Eta:
    """A long phase of `total` units (bytes written, blocks checked) that says how far it is and
    when it should end, at most once every `every` seconds and once at the end."""

    def __init__(self, say: Callable[[str], None], label: str, total: float, every: float = 10.0):
        self.say, self.label, self.total, self.every = say, label, max(total, 1), every
        self.start = self.last = time.monotonic()

    def __call__(self, done: float) -> None:
        now = time.monotonic()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed * (self.total - done) / done if done else float("nan")
        share = f"{100 * done / self.total:.0f}%"
        rest = f", about {left:.0f} s left" if done < self.total else ""
        self.say(f"{self.label}: {share}, {elapsed:.0f} s{rest}")
