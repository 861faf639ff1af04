"""torchvision and timm architectures at tiny sizes through both exporters: every LayerNorm fused
(ConvNeXt's channels-first ones included), PyTorch vs ONNX Runtime."""

import importlib

import onnx
import pytest

from ticknorm import ExportOptions, Inputs, api
from ticknorm.exporter.inspect import summarize


def _importable(module: str) -> str:
    """'' when `module` imports, else why not. PyPI's torchvision fails at import beside a CPU-only
    torch build ('operator torchvision::nms does not exist'), which importorskip does not catch."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001
        return f"{module} does not import here ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return ""


MODELS = [("vit_b_16", "torchvision", "x"), ("swin_t", "torchvision", "x"), ("convnext_tiny", "torchvision", "x"),
          ("timm_convnext", "timm", "x"), ("timm_deit", "timm", "x")]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("factory, package, argument", MODELS, ids=[m[0] for m in MODELS])
def test_vision_model_exports_with_every_layer_norm_fused(factory, package, argument, exporter, tmp_path):
    reason = _importable(package)
    if reason:
        pytest.skip(reason)
    result = api.export(f"tests/vision_models.py:{factory}", Inputs((f"{argument}:batch=2x3x32x32",)), tmp_path / "m.onnx",
                        ExportOptions(exporter=exporter))
    assert result.passed and result.accuracy[0].max_abs < 1e-4
    summary = summarize(onnx.load(str(tmp_path / "m.onnx")))
    assert summary.decomposed_norms == 0 and summary.fused_norms > 0
