"""Where an ONNX file's external weights may be: inside the file's own folder, nowhere else.

onnx and ONNX Runtime refuse a `location` that leaves the folder too, but only when they open it:
too late (opening a FIFO or a device already blocks or reads) and as an error the CLI could only
call unexpected. onnx 1.23 offers no check that can be asked first: `checker.check_tensor` judges a
location against the process's working directory (its CheckerContext has no model folder from
Python) and `_open_external_data` opens the file. So every external tensor onnx would read (its
own walk: initializers and Constant tensors of the graph, its If/Loop/Scan bodies and the model's
functions) is judged here by its path alone, before anything stats, opens or maps its file.

A symbolic link is followed (`realpath` reads the links, never the data): one whose target stays
in the folder passes here, a file link or a path through a linked folder alike, and one that
leaves it is refused. onnx's reader refuses every link when it loads the weights; that is its
own error, one line from `load_onnx`."""

import ntpath
import os
import posixpath
from pathlib import Path

import onnx

from ticknorm.base.errors import WeightsOutsideError
from ticknorm.base.external_data import all_tensors, external_entries, is_external


def check_inside(model: onnx.ModelProto, path: Path) -> None:
    """Refuse `model` (read from `path`) if any of its external tensors lies outside `path`'s folder."""
    for tensor in all_tensors(model):
        if is_external(tensor):
            _check_tensor(tensor, path)


def _check_tensor(tensor: onnx.TensorProto, path: Path) -> None:
    location = external_entries(tensor).get("location", "")
    why = _escape(location, path.parent)
    if why:
        raise WeightsOutsideError(f"weights outside the model's folder are refused: {path} keeps tensor "
                                  f"{tensor.name!r} in {location!r}, {why}")


def _escape(location: str, folder: Path) -> str | None:
    """How `location` leaves `folder`, or None. Backslashes count as separators and drive letters
    as absolute: a file that escapes on Windows is refused everywhere."""
    if location.startswith(("/", "\\")) or ntpath.splitdrive(location)[0]:
        return "an absolute path"
    lexical = posixpath.normpath(location.replace("\\", "/"))
    if lexical == ".." or lexical.startswith("../"):
        return "a path that climbs out of it"
    if "\0" in location:
        return "a name with a NUL byte (a reader in C would cut it short)"
    base = os.path.realpath(folder)
    target = os.path.realpath(folder / location)
    if os.path.commonpath([base, target]) != base:
        return f"a symbolic link to {target}"
    return None
