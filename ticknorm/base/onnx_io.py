"""Load and save ONNX models with clear errors, atomic writes and external data for big models."""

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError

from ticknorm.base.errors import OnnxFileError, first_line

# Protobuf cannot serialize a message of 2 GiB or more; stay clear of the limit.
PROTOBUF_LIMIT = 2**31 - 2**26


def load_onnx(path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"ONNX file not found: {path}")
    try:
        return onnx.load(str(path))
    except (DecodeError, onnx.onnx_cpp2py_export.checker.ValidationError, RuntimeError, ValueError) as exc:
        raise OnnxFileError(f"{path} is not a readable ONNX model ({first_line(exc)})") from exc


# Models whose weights reach this size are exported with their weights in a file: protobuf copies
# every message it builds, so a graph held in memory costs its weights again at each rewrite, and
# ONNX Runtime sessions made from bytes copy them twice more. On disk, each rewrite copies only
# references and each session memory-maps the one file.
WEIGHTS_ON_DISK_BYTES = 256 * 2**20
WEIGHTS_FILE_STEM = "staged"


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def has_external_weights(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in model.graph.initializer)


def stage_weights(model_file: Path) -> onnx.ModelProto:
    """The graph in `model_file` without its weights' bytes: they stay in the external data file
    beside it (written there with `size_threshold` 1 KiB), referenced by location."""
    model = onnx.load(str(model_file), load_external_data=False)
    if not has_external_weights(model):  # written inline (a small model): move the weights out
        onnx.save_model(model, str(model_file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=model_file.name + ".data", size_threshold=1024)
        model = onnx.load(str(model_file), load_external_data=False)
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
    """Write `model` to `path`; weights go to `<name>.data` beside it when they exceed the threshold.
    A model staged with `stage_weights` names the folder of its weights in `weights_dir`: their
    file is copied as it is (streamed, never loaded) when the output keeps external data.

    Everything is written into a temporary folder beside the target and renamed into place, data
    file first, so an interrupted save leaves the previous files (or none), never a torn pair.
    Returns the paths written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = initializer_bytes(model) > external_data_threshold
    data_name = path.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged_model = staging / path.name
        if weights_dir is not None and has_external_weights(model):
            _save_staged(model, staged_model, Path(weights_dir), data_name if external else None)
            if external:
                os.replace(staging / data_name, path.parent / data_name)
        elif external:
            onnx.save_model(model, str(staged_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            # save_model moved the weights out of `model`; give the caller its weights back.
            onnx.load_external_data_for_model(model, str(staging))
            os.replace(staging / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(staged_model))
        os.replace(staged_model, path)
    except OSError as exc:
        raise OnnxFileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [path, path.parent / data_name] if external else [path]


def _save_staged(model: onnx.ModelProto, target: Path, weights_dir: Path, data_name: str | None) -> None:
    """Save a staged model: with its weights file copied beside `target` as `data_name`, or with
    the weights read back inline when `data_name` is None."""
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
    shutil.copyfile(weights_dir / sources.pop(), target.parent / data_name)
    onnx.save_model(copy, str(target))


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
