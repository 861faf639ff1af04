"""The ticks file: JSON lines, one per module per tick, each holding `step` and `module`.

An append log, not an atomic write like ticknorm's other outputs: every tick is appended and
flushed when it is recorded, so a run that is killed keeps every tick it finished. A kill can cut
the line being written short; the next append starts on a fresh line (a resumed run adds to the
same file) and the reader skips such lines with a warning."""

import warnings
from pathlib import Path

from ticknorm.base.errors import TicknormWarning, TicksError
from ticknorm.base.json_lines import append_lines, read_lines


def append_ticks(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    append_lines(path, records)


def read_ticks(path) -> list[dict]:
    """Every tick record of the file, in file order. Lines that are no tick (cut short by a
    killed writer) are skipped with a warning; a file with no tick at all is refused."""
    path = Path(path)
    if not path.is_file():
        raise TicksError(f"ticks file not found: {path}")
    try:
        records, skipped = read_lines(path, _is_tick)
    except UnicodeDecodeError:
        raise TicksError(f"{path} is not a ticks file (not text); ticknorm.ticks.Recorder writes one") from None
    if not records:
        raise TicksError(f"{path} holds no ticks: no line is a JSON object with 'step' and 'module' "
                         "(ticknorm.ticks.Recorder writes them)")
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} line(s) that are no tick (line {shown}); a run killed while "
                      "writing cuts its last line short", TicknormWarning, stacklevel=2)
    return records


def _is_tick(record: dict) -> bool:
    return isinstance(record.get("step"), int) and isinstance(record.get("module"), str)
