"""Append logs of JSON lines (a training run's ticks, a bundle's check history): a writer killed
mid-line loses that line only. The next append starts on a fresh line instead of gluing onto the
torn one, and readers skip lines that are not a record, reporting their numbers."""

import json
import os
from pathlib import Path


def append_lines(path: Path, records: list[dict]) -> None:
    """Append `records`, one JSON line each, in one write, flushed."""
    if not records:
        return
    text = "".join(json.dumps(record) + "\n" for record in records)
    with open(path, "ab+") as log:
        log.seek(0, os.SEEK_END)
        if log.tell():
            log.seek(-1, os.SEEK_END)
            if log.read(1) != b"\n":  # a killed append left half a line: ours starts a fresh one
                text = "\n" + text
        log.write(text.encode())
        log.flush()


def read_lines(path: Path, accept) -> tuple[list[dict], list[int]]:
    """(the lines that parse to a record `accept` takes, the numbers of the other non-empty lines)."""
    records, damaged = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and accept(record):
            records.append(record)
        else:
            damaged.append(number)
    return records, damaged
