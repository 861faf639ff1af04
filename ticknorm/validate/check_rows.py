"""One row per check of `runtimes --check`, whatever happened inside the check: a deployer on a
new host needs every answer at once, so a missing driver, backend or plugin becomes its row's
one-line reason and never stops the checks after it."""

import statistics
import time
from dataclasses import dataclass, replace
from collections.abc import Callable

from ticknorm.base.errors import MissingDependencyError, RuntimeUnavailable, TicknormError, first_line

PASS, FAIL, ERROR, UNAVAILABLE, REFERENCE = "pass", "FAIL", "error", "unavailable", "reference"
WARMUP = 3


@dataclass
class CheckRow:
    check: str
    version: str = "-"
    device: str = "-"
    verdict: str = UNAVAILABLE  # PASS, FAIL (wrong numbers), ERROR (present but broke), UNAVAILABLE, REFERENCE
    max_error: float | None = None
    tolerance: tuple[float, float] | None = None  # (atol, rtol) it was judged at
    median_ms: float | None = None
    note: str = ""  # why it could not run, what broke, or what it was measured beside


def failed_row(row: CheckRow, exc: Exception) -> CheckRow:
    """A missing piece (runtime, driver, backend, plugin, package) is `unavailable`, not a
    failure of this host's stack; anything else that stopped a present runtime is an `error`."""
    if isinstance(exc, (RuntimeUnavailable, MissingDependencyError)):
        return replace(row, verdict=UNAVAILABLE, note=first_line(exc))
    prefix = "" if isinstance(exc, TicknormError) else f"{type(exc).__name__}: "
    return replace(row, verdict=ERROR, note=prefix + first_line(exc))


def caught(row: CheckRow, check: Callable[[], CheckRow]) -> CheckRow:
    """`check()`'s row, or `row` with the reason it could not give one."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - every check ends in its own row
        return failed_row(row, exc)


def median_ms(call: Callable[[], object], iterations: int) -> float:
    """Median host-clock milliseconds of `call` (which waits for its own device work) after a few
    untimed calls: a health figure beside the verdict, not a benchmark."""
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6
