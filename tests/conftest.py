import numpy as np
import onnx
import pytest

from ticknorm.exporter.export import torch_to_onnx
from ticknorm.runtime.ort_runner import OrtRunner

torch = pytest.importorskip("torch")


def export(module, feeds: dict, exporter: str, opset=None, dynamic_axes=None) -> onnx.ModelProto:
    """A real torch.onnx export of a real module (unfused, scopes annotated)."""
    return torch_to_onnx(module, feeds, exporter, opset, dynamic_axes)


def torch_outputs(module, feeds: dict) -> list[np.ndarray]:
    with torch.no_grad():
        out = module.eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    out = out if isinstance(out, (tuple, list)) else (out,)
    return [o.float().numpy() for o in out]


def ort_run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """One run of a real ONNX Runtime session, closed after."""
    with OrtRunner(model) as runner:
        return runner.infer(feeds).outputs


def ort_outputs(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return list(ort_run(model, feeds).values())


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)

