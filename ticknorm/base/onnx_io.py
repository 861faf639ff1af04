"""Load and save ONNX models with clear errors, atomic writes and external data for big models."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError

from ticknorm.base.atomic import check_writable
from ticknorm.base.errors import OnnxFileError, first_line
from ticknorm.base.manifest import describe, mismatch

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of the limit.
PROTOBUF_LIMIT = 2**31 - 2**26


def load_onnx(path) -> onnx.ModelProto:
    """The model at `path` with its weights, after checking that its external weights file is the
    one it was written with (see `save_onnx`): a pair torn by a killed write, or a data file from
    another export, is refused with the reason."""
    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, onnx.onnx_cpp2py_export.checker.ValidationError, RuntimeError, ValueError) as exc:
        raise OnnxFileError(f"{path} is not a readable ONNX model ({first_line(exc)})") from exc
    if has_external_weights(model):
        _check_weights_file(model, path)
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, RuntimeError) as exc:
            raise OnnxFileError(f"cannot read the weights of {path} ({first_line(exc)})") from exc
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
    return {entry.value for tensor in model.graph.initializer if is_external(tensor)
            for entry in tensor.external_data if entry.key == "location"}




def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def has_external_weights(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer)


def stage_weights(model_file: Path) -> onnx.ModelProto:
    """The graph in `model_file` without its weights' bytes: they stay in the external data file
    beside it (written there with `size_threshold` 1 KiB), referenced by location."""
    model = onnx.load(str(model_file), load_external_data=False)
    return model if has_external_weights(model) else staged(model, model_file)  # inline (a small model): moved out


def staged(model: onnx.ModelProto, model_file: Path) -> onnx.ModelProto:
    """`model` with its weights written to the external data file beside `model_file` and
    dropped from memory (onnx clears each tensor's bytes once written): the references stay."""
    onnx.save_model(model, str(model_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=model_file.name + ".data", size_threshold=1024)
    return model


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
    file is copied as it is (streamed, never loaded) when the output keeps external data.

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
            _save_staged(model, staged_model, Path(weights_dir), data_name if external and _only_staged(model) else None)
            if external and not _only_staged(model):  # rewritten weights inline beside staged ones: one new file
                _save_external(onnx.load(str(staged_model)), staged_model, data_name)
        elif external:
            _save_external(model, staged_model, data_name)
            # save_model moved the weights out of `model`; give the caller its weights back.
            onnx.load_external_data_for_model(model, str(staging))
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


def _save_external(model: onnx.ModelProto, target: Path, data_name: str) -> None:
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                    size_threshold=1024)


# Weights a rewrite adds inline (a fused norm's new scale, a folded constant) stay in the `.onnx`
# beside references to the staged file, up to this many bytes in all; past it (a precision
# conversion rewrites every weight) they are written out, with the rest, into one new file.
INLINE_BESIDE_STAGED = 16 * 2**20


def _only_staged(model: onnx.ModelProto) -> bool:
    """Whether the staged file still holds (nearly) all the weights: then it is the weights file,
    linked or copied as it is."""
    return sum(len(t.raw_data) for t in model.graph.initializer if not is_external(t)) <= INLINE_BESIDE_STAGED


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


def _save_staged(model: onnx.ModelProto, target: Path, weights_dir: Path, data_name: str | None) -> None:
    """Save a staged model: with its weights file linked (or copied) beside `target` as `data_name`,
    or with the weights read back inline when `data_name` is None."""
    if data_name is None:
        inline = onnx.ModelProto()
        inline.CopyFrom(model)
        onnx.load_external_data_for_model(inline, str(weights_dir))
        onnx.save_model(inline, str(target))
        return
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


def _link_or_copy(source: Path, target: Path) -> None:
    """A second name for the staged weights where they share a filesystem (a stage beside the
    output: no byte copied), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@contextlib.contextmanager
def session_source(model: onnx.ModelProto, weights_dir=None):
    """What an ONNX Runtime session loads `model` from: its bytes, or a file while the session is
    made, beside its staged weights (`weights_dir`, which the session then memory-maps) or with
    the weights written out when the model is too big for bytes."""
    if weights_dir is not None and has_external_weights(model):
        with tempfile.NamedTemporaryFile(dir=weights_dir, suffix=".onnx") as handle:
            handle.write(model.SerializeToString())  # references only: small
            handle.flush()
            yield handle.name
    elif initializer_bytes(model) < PROTOBUF_LIMIT:
        yield model.SerializeToString()
    else:
        with tempfile.TemporaryDirectory() as workdir:
            target = Path(workdir) / "model.onnx"
            save_onnx(model, target, external_data_threshold=0)
            yield str(target)


def model_digest(model: onnx.ModelProto) -> str:
    """sha256 over the nodes, inputs, outputs and every weight's bytes: what identifies a model
    for engine caches and drift bundles, whether its weights are inline or external."""
    digest = hashlib.sha256()
    graph = model.graph
    for part in list(graph.input) + list(graph.output) + list(graph.node):
        digest.update(part.SerializeToString(deterministic=True))
    for tensor in graph.initializer:
        digest.update(tensor.name.encode())
        digest.update(str((tensor.data_type, tuple(tensor.dims))).encode())
        digest.update(tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes())
    return digest.hexdigest()
