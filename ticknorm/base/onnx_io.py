"""Load and save ONNX models with clear errors, atomic writes and external data for big models."""

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.numpy_helper
import onnx_ir as ir
from google.protobuf.message import DecodeError

from ticknorm.base.atomic import check_writable
from ticknorm.base.errors import OnnxFileError, first_line
from ticknorm.base.external_data import external_entries, is_external
from ticknorm.base.graph_only import graph_bytes
from ticknorm.base.manifest import describe, mismatch
from ticknorm.base.weight_paths import check_inside

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of the limit.
PROTOBUF_LIMIT = 2**31 - 2**26


def load_onnx(path, weights: bool = True) -> onnx.ModelProto:
    """The model at `path` with its weights, after checking that its external weights file is the
    one it was written with (see `save_onnx`): a pair torn by a killed write, or a data file from
    another export, is refused with the reason. With `weights` False, the graph alone: every large
    tensor a reference to its bytes in the files (`graph_only`), none of them read."""
    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"ONNX file not found: {path}")
    try:
        model = _parsed(path, weights)
    except (DecodeError, onnx.onnx_cpp2py_export.checker.ValidationError, RuntimeError, ValueError) as exc:
        raise OnnxFileError(f"{path} is not a readable ONNX model ({first_line(exc)})") from exc
    check_inside(model, path)  # before any weights file is looked at
    if has_external_weights(model):
        _check_weights_file(model, path)
        if weights:
            try:
                onnx.load_external_data_for_model(model, str(path.parent))
            except (OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
                raise OnnxFileError(f"cannot read the weights of {path} ({first_line(exc)})") from exc
    return model


def _parsed(path: Path, weights: bool) -> onnx.ModelProto:
    """The file as ONNX reads it, external weights left where they are. A binary file is parsed
    from a read-only map of it, not from a copy read into memory first: a model with its weights
    inside is then held once, not twice, on the way (and not at all without `weights`)."""
    if onnx.serialization.registry.get_format_from_file_extension(path.suffix) not in (None, "protobuf"):
        return onnx.load(str(path), load_external_data=False)  # a text format
    model = onnx.ModelProto()
    if path.stat().st_size == 0:
        raise DecodeError("the file is empty")
    if not weights:
        model.ParseFromString(graph_bytes(path))
        return model
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        size, view = len(mapped), memoryview(mapped)
        try:
            decoded = model.ParseFromString(view)  # copies what it keeps: the map can close
        finally:
            view.release()
    if decoded is not None and decoded != size:
        raise DecodeError(f"only {decoded} of its {size} bytes decode")
    return model


WEIGHTS_RECORD = "ticknorm.weights"  # metadata: the weights file an .onnx was written with


def _check_weights_file(model: onnx.ModelProto, path: Path) -> None:
    for location in sorted(external_locations(model)):
        if not (path.parent / location).is_file():
            raise OnnxFileError(f"{path} keeps its weights in {location}, which is missing next to it")
    record = next((p.value for p in model.metadata_props if p.key == WEIGHTS_RECORD), None)
    if record is None:
        return  # written by another tool: nothing to check the file against
    try:
        expected = json.loads(record)
        problem = mismatch(path.parent / expected["file"], expected, sampled=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise OnnxFileError(f"{path} has an unreadable {WEIGHTS_RECORD} record ({first_line(exc)})") from exc
    if problem:
        raise OnnxFileError(f"{path} and its weights file do not belong together ({problem}): an export killed "
                            "halfway, or a weights file from another export; export again")


def external_locations(model: onnx.ModelProto) -> set[str]:
    return {external_entries(tensor)["location"] for tensor in model.graph.initializer if is_external(tensor)}


def has_external_weights(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer)


def stage_weights(model_file: Path) -> onnx.ModelProto:
    """The graph in `model_file` without its weights' bytes: they stay in the external data file
    beside it (written there with `size_threshold` 1 KiB), referenced by location."""
    model = onnx.load(str(model_file), load_external_data=False)
    return model if has_external_weights(model) else staged(model, model_file)  # inline (a small model): moved out


def staged(model: onnx.ModelProto, model_file: Path) -> onnx.ModelProto:
    """`model`'s weights written to the external data file beside `model_file`, and the graph
    saved there read back: its weights references into that file, none held."""
    _save_external(model, model_file, model_file.name + ".data")
    return onnx.load(str(model_file), load_external_data=False)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data, counted without serializing (which fails above 2 GiB)."""
    return sum(len(t.raw_data) or _typed_bytes(t) for t in model.graph.initializer)


def _typed_bytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def save_onnx(model: onnx.ModelProto, path, external_data_threshold: int = PROTOBUF_LIMIT,
              weights_dir=None) -> list[Path]:
    """Write `model` to `path`; weights go to a `.data` file beside it when they exceed the threshold.
    A model staged with `stage_weights` names the folder of its weights in `weights_dir`: their
    file becomes the output's weights file as it is (linked, else copied) while the graph still
    uses it, and is otherwise streamed one tensor at a time, never loaded whole.

    The `.onnx` and its weights are one unit, switched by one rename: the weights file gets a name
    the `.onnx` now at `path` does not use (`<name>.data`, else `<name>.1.data`), the new `.onnx`
    (which records that file's size and digest, checked by `load_onnx`) replaces the old one, and
    only then is the old weights file removed. A kill at any point leaves the previous pair or the
    new one, never a mix. Returns the paths written.
    """
    path = Path(path)
    check_writable(path, "ONNX file")
    external = initializer_bytes(model) > external_data_threshold
    previous = _weights_in_use(path)
    data_name = next(name for name in (path.name + ".data", path.name + ".1.data") if name not in previous)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise OnnxFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        staged_model = staging / path.name
        if weights_dir is not None and has_external_weights(model):
            if not external:
                _stream_inline(model, staged_model, Path(weights_dir))
            elif _only_staged(model, Path(weights_dir)):
                _link_staged(model, staged_model, Path(weights_dir), data_name)
            else:  # rewritten weights inline beside staged ones (a precision conversion): one new file
                _save_external(model, staged_model, data_name, Path(weights_dir))
        elif external:
            _save_external(model, staged_model, data_name)
        else:
            onnx.save_model(model, str(staged_model))
        if external:
            _record_weights(staged_model, staging / data_name)
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staged_model, path)  # the switch: from here on the new pair is the one at `path`
        for name in previous - {data_name}:
            (path.parent / name).unlink(missing_ok=True)
    except OSError as exc:
        raise OnnxFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [path, path.parent / data_name] if external else [path]


# Weights of a MiB or more start at multiples of a page in a weights file ticknorm writes: ONNX
# Runtime memory-maps an external tensor only when its offset is page-aligned, else it reads a
# private copy (smaller ones are not worth the padding).
ALIGNMENT, ALIGN_FROM = 4096, 2**20


def _save_external(model: onnx.ModelProto, target: Path, data_name: str, weights_dir: Path | None = None) -> None:
    """Save `model` with every weight over 1 KiB in one new weights file `data_name` beside
    `target` (onnx-ir's `save`: one tensor in memory at a time, each big one at a page-aligned
    offset, `model` left as it was). Weights that are references into files in `weights_dir`
    are read from there."""
    written = ir.from_proto(model)
    if weights_dir is not None:
        ir.external_data.set_base_dir(written.graph, weights_dir)
    ir.save(written, str(target), external_data=data_name, size_threshold_bytes=1024, alignment=ALIGNMENT,
            align_threshold=ALIGN_FROM - 1)


def _only_staged(model: onnx.ModelProto, weights_dir: Path) -> bool:
    """Whether the graph still uses (nearly) all of the staged weights file: then that file is its
    weights file, linked or copied as it is, and weights a rewrite added inline (a fused norm's
    new scale) stay in the graph. A precision conversion leaves most of it unused: its weights
    are written anew."""
    used, files = 0, set()
    for tensor in model.graph.initializer:
        if is_external(tensor):
            entries = external_entries(tensor)
            files.add(entries["location"])
            used += int(entries.get("length", 0))
    return len(files) == 1 and used >= 0.9 * (weights_dir / files.pop()).stat().st_size


def _weights_in_use(path: Path) -> set[str]:
    """The weights files the `.onnx` at `path` (if any, if readable) references."""
    if not path.is_file():
        return set()
    try:
        return external_locations(onnx.load(str(path), load_external_data=False))
    except (DecodeError, RuntimeError, ValueError, OSError):
        return set()


def _record_weights(model_file: Path, data_file: Path) -> None:
    """Write into the staged `.onnx` which weights file it was saved with (references only: small)."""
    model = onnx.load(str(model_file), load_external_data=False)
    record = {"file": data_file.name, **describe(data_file, sampled=True)}
    for prop in [p for p in model.metadata_props if p.key == WEIGHTS_RECORD]:
        model.metadata_props.remove(prop)
    model.metadata_props.add(key=WEIGHTS_RECORD, value=json.dumps(record))
    onnx.save_model(model, str(model_file))


def _link_staged(model: onnx.ModelProto, target: Path, weights_dir: Path, data_name: str) -> None:
    """Save a staged model with its weights file linked (or copied) beside `target` as `data_name`."""
    sources = set()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # references only: the weights are on disk
    for tensor in copy.graph.initializer:
        for entry in tensor.external_data if is_external(tensor) else ():
            if entry.key == "location":
                sources.add(entry.value)
                entry.value = data_name
    if len(sources) != 1:
        raise OnnxFileError(f"staged weights come from {len(sources)} files, expected one")
    _link_or_copy(weights_dir / sources.pop(), target.parent / data_name)
    onnx.save_model(copy, str(target))


def _stream_inline(model: onnx.ModelProto, target: Path, weights_dir: Path) -> None:
    """Save a staged model with every weight inline, one tensor in memory at a time: protobuf
    merges concatenated messages, so the graph without its external weights is written first and
    each weight follows as a message of its own (`ModelProto{graph{initializer: [w]}}`)."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    external = [t for t in skeleton.graph.initializer if is_external(t)]
    kept = [t for t in skeleton.graph.initializer if not is_external(t)]
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(kept)
    with open(target, "wb") as out:
        out.write(skeleton.SerializeToString())
        for tensor in external:
            whole = onnx.ModelProto()
            inline = whole.graph.initializer.add()
            inline.CopyFrom(tensor)
            inline.raw_data = _external_bytes(tensor, weights_dir)
            del inline.external_data[:]
            inline.data_location = onnx.TensorProto.DEFAULT
            out.write(whole.SerializeToString())


def _external_bytes(tensor: onnx.TensorProto, weights_dir: Path) -> bytes:
    entries = external_entries(tensor)
    with open(weights_dir / entries["location"], "rb") as source:
        source.seek(int(entries.get("offset", 0)))
        return source.read(int(entries["length"])) if "length" in entries else source.read()


def _link_or_copy(source: Path, target: Path) -> None:
    """A second name for the staged weights where they share a filesystem (a stage beside the
    output: no byte copied), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@contextlib.contextmanager
def session_source(model: onnx.ModelProto, weights_dir=None):
    """What an ONNX Runtime session loads `model` from: its bytes (a graph whose weights are
    references into files in `weights_dir` too: the session, told that folder, maps them from
    there), or a file while the session is made, with the weights written out when the model is
    too big for bytes."""
    if (weights_dir is not None and has_external_weights(model)) or initializer_bytes(model) < PROTOBUF_LIMIT:
        yield model.SerializeToString()
    else:
        with tempfile.TemporaryDirectory() as workdir:
            target = Path(workdir) / "model.onnx"
            save_onnx(model, target, external_data_threshold=0)
            yield str(target)


def model_digest(model: onnx.ModelProto, weights_dir=None) -> str:
    """sha256 over the nodes, inputs, outputs and every weight's bytes: what identifies a model
    for engine caches and drift bundles, whether its weights are inline or external. A graph whose
    weights are references into files in `weights_dir` (a file's graph read alone, `graph_only`)
    hashes the bytes they point to: the digest of the model read whole."""
    digest = hashlib.sha256()
    graph = model.graph
    for part in list(graph.input) + list(graph.output) + list(graph.node):
        digest.update(part.SerializeToString(deterministic=True))
    for tensor in graph.initializer:
        digest.update(tensor.name.encode())
        digest.update(str((tensor.data_type, tuple(tensor.dims))).encode())
        if weights_dir is not None and is_external(tensor):
            digest.update(_external_bytes(tensor, Path(weights_dir)))
        else:
            digest.update(tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes())
    return digest.hexdigest()

