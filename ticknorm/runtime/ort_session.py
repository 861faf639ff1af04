"""ONNX Runtime sessions built the same way everywhere ticknorm needs one."""

import tempfile

import numpy as np
import onnx

from ticknorm.errors import OnnxFileError
from ticknorm.onnx_io import serialize_or_save


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None,
             optimize: bool = True, providers=("CPUExecutionProvider",)) -> dict[str, np.ndarray]:
    """Run `model` once. `optimize=False` turns ORT's graph rewrites off, so what runs is exactly
    the graph we wrote (how fusions are verified)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with tempfile.TemporaryDirectory() as workdir:
        try:
            session = ort.InferenceSession(serialize_or_save(model, workdir), options, providers=list(providers))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors
            raise OnnxFileError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0]}") from exc
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
