"""Load and save ONNX models with clear errors, atomic writes and external data for big models."""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError

from ticknorm.errors import OnnxFileError, first_line

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


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weight data, counted without serializing (which fails above 2 GiB)."""
    return sum(len(t.raw_data) or _typed_bytes(t) for t in model.graph.initializer)


def _typed_bytes(tensor: onnx.TensorProto) -> int:
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def save_onnx(model: onnx.ModelProto, path, external_data_threshold: int = PROTOBUF_LIMIT) -> list[Path]:
    """Write `model` to `path`; weights go to `<name>.data` beside it when they exceed the threshold.

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
        if external:
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


def serialize_or_save(model: onnx.ModelProto, workdir: Path) -> str | bytes:
    """Bytes for an in-memory ONNX Runtime session, or a file path when the model is too big."""
    if initializer_bytes(model) < PROTOBUF_LIMIT:
        return model.SerializeToString()
    target = Path(workdir) / "model.onnx"
    save_onnx(model, target, external_data_threshold=0)
    return str(target)



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
