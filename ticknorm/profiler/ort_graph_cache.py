"""ONNX Runtime's optimized graph of a model file, kept between profiles of that file.

The profiler maps the nodes ONNX Runtime created (fused norms, attention) back to modules through
the graph it writes after optimizing (`align.ScopeTable.learn_rewritten`). Writing that graph
costs ONNX Runtime a copy of every weight (about 0.15 s of a 0.9 s profile of BERT-base, seconds
at 1B parameters) though only the graph is read back. The graph is the same for the same file,
ONNX Runtime version, provider and optimization level, so it is kept under that key, weights left
out (about 100 KB for BERT-base), in the user's cache folder: `$TICKNORM_CACHE`, else
`$XDG_CACHE_HOME/ticknorm`, else `~/.cache/ticknorm`; `TICKNORM_CACHE=off` keeps nothing. A file
is known by its path, size, modification time and inode, as build tools know their inputs: a file
written again (an export to the same path) is a new entry. A graph given in memory is not kept."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx

CACHE_ENV = "TICKNORM_CACHE"
KEPT = 64  # entries; the least recently used go first


def cache_folder() -> Path | None:
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    if value:
        return Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ticknorm"


def entry(model_file: str | None, provider: str, optimization: str) -> Path | None:
    """Where the optimized graph of `model_file` under these settings is kept; None when nothing
    is kept (no file, or no cache)."""
    folder = cache_folder()
    if folder is None or model_file is None:
        return None
    import onnxruntime

    try:
        stat = os.stat(model_file)
    except OSError:
        return None
    key = [str(Path(model_file).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, onnxruntime.__version__,
           provider, optimization]
    return folder / "ort-graphs" / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32] + ".onnx")


def read(kept: Path | None) -> onnx.ModelProto | None:
    """The kept graph, or None when there is none (or it cannot be read: it is written again)."""
    if kept is None or not kept.is_file():
        return None
    try:
        graph = onnx.load(str(kept), load_external_data=False)
        os.utime(kept)  # recently used
    except Exception:  # noqa: BLE001 - a damaged entry is only a missed one
        return None
    return graph


def keep(kept: Path | None, written: str) -> None:
    """The graph ONNX Runtime wrote, copied into the cache whole or not at all. A cache that
    cannot be written is no error: the next profile has ONNX Runtime write the graph again."""
    if kept is None:
        return
    partial = kept.with_name(f"{kept.name}.{os.getpid()}.partial")
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(written, partial)
        os.replace(partial, kept)
        _evict(kept.parent)
    except OSError:
        partial.unlink(missing_ok=True)


def _evict(folder: Path) -> None:
    entries = sorted(folder.glob("*.onnx"), key=lambda path: path.stat().st_mtime, reverse=True)
    for stale in entries[KEPT:]:
        stale.unlink(missing_ok=True)
