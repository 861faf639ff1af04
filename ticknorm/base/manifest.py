"""Manifests: what a unit of files (a golden bundle, an `.onnx` and its weights file) held when it
was written whole, so a reader can tell a complete unit from a torn or mixed one.

A manifest lists each file's size and sha256 and the unit's generation; it is written last, so a
unit whose files do not match it was not finished (a killed writer) or was changed since (a copy
of one file from elsewhere, an edit by hand)."""

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
# Weights files can be many GiB: they are identified by their size and a digest of three 1 MiB
# samples (start, middle, end), enough to tell two exports apart without reading the whole file.
SAMPLE = 2**20


def file_digest(path: Path, sampled: bool = False) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if sampled and size > 3 * SAMPLE:
            for offset in (0, size // 2, size - SAMPLE):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE))
        else:
            for block in iter(lambda: handle.read(2**24), b""):
                digest.update(block)
    return digest.hexdigest()


def describe(path: Path, sampled: bool = False) -> dict:
    return {"size": path.stat().st_size, "sha256": file_digest(path, sampled)}


def mismatch(path: Path, expected: dict, sampled: bool = False) -> str | None:
    """Why `path` is not the file `expected` describes, or None when it is."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != expected.get("size"):
        return f"{path.name} has {size} bytes, its manifest says {expected.get('size')}"
    if file_digest(path, sampled) != expected.get("sha256"):
        return f"{path.name} differs from the file its manifest describes"
    return None


def write_manifest(folder: Path, names: list[str], generation: int) -> None:
    """Describe `names` in `folder`; called after they are all written."""
    entries = {name: describe(folder / name) for name in names}
    (folder / MANIFEST).write_text(json.dumps({"generation": generation, "files": entries}, indent=2))


def read_manifest(folder: Path) -> dict | None:
    """The manifest, or None when the folder has none; a manifest that is not one raises ValueError."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{MANIFEST} lists no files")
    return manifest


def unit_problems(folder: Path, manifest: dict) -> list[str]:
    """Every file of the unit that does not match its manifest."""
    problems = []
    for name, expected in manifest["files"].items():
        found = mismatch(folder / name, expected if isinstance(expected, dict) else {})
        if found:
            problems.append(found)
    return problems
