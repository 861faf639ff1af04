"""Which runtimes exist on this machine, and runners built from a runtime name.

Names: `ort` / `ort-cpu`, `ort-cuda`, `trt` / `trt-fp16` / `trt-bf16`, and PyTorch itself as a
target: `torch-fp16`, `torch-bf16`, `torch-cuda[-fp16|-bf16]` (the reference is always fp32 CPU)."""

import copy
import dataclasses
import importlib
from dataclasses import dataclass

import onnx

from ticknorm.base.errors import InputSpecError
from ticknorm.runtime.base import Runner
from ticknorm.runtime.ort_runner import OrtRunner
from ticknorm.runtime.torch_runner import TorchRunner
from ticknorm.runtime.trt_runner import TrtRunner, TrtSettings

RUNTIME_NAMES = ("ort", "ort-cpu", "ort-cuda", "trt", "trt-fp16", "trt-bf16",
                 "torch-fp16", "torch-bf16", "torch-cuda", "torch-cuda-fp16", "torch-cuda-bf16")


@dataclass
class RuntimeStatus:
    name: str
    version: str
    available: bool
    reason: str = ""


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def runtime_statuses() -> list[RuntimeStatus]:
    statuses = []
    torch_version = _version("torch")
    cuda = False
    if torch_version:
        import torch

        cuda = torch.cuda.is_available()
    statuses.append(RuntimeStatus("torch", torch_version or "-", bool(torch_version),
                                  "" if torch_version else "torch is not installed (pip install 'ticknorm[torch]')"))
    statuses.append(RuntimeStatus("torch-cuda", torch_version or "-", cuda,
                                  "" if cuda else "no CUDA device visible to torch"))
    ort_version = _version("onnxruntime")
    providers = []
    if ort_version:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    statuses.append(RuntimeStatus("ort-cpu", ort_version or "-", "CPUExecutionProvider" in providers,
                                  "" if ort_version else "onnxruntime is not installed"))
    has_cuda_provider = "CUDAExecutionProvider" in providers
    statuses.append(RuntimeStatus("ort-cuda", ort_version or "-", has_cuda_provider and cuda,
                                  "" if has_cuda_provider and cuda else
                                  ("no CUDA device" if has_cuda_provider else
                                   "this onnxruntime build has no CUDAExecutionProvider (pip install 'ticknorm[gpu]')")))
    trt_version = _version("tensorrt")
    statuses.append(RuntimeStatus("trt", trt_version or "-", bool(trt_version) and cuda,
                                  "" if trt_version and cuda else
                                  ("no CUDA device" if trt_version else "tensorrt is not installed (pip install 'ticknorm[trt]')")))
    return statuses


def make_runner(name: str, model: onnx.ModelProto, profile: dict | None = None, ort_optimization: str = "all",
                trt_settings: TrtSettings | None = None, module=None, fp32_modules=()) -> Runner:
    """`module` is the PyTorch model, needed by `torch-*` targets (PyTorch itself in another
    precision or on CUDA, judged against the fp32 CPU reference)."""
    if name not in RUNTIME_NAMES:
        raise InputSpecError(f"unknown runtime '{name}'; choose from: {', '.join(RUNTIME_NAMES)}")
    if name.startswith("torch"):
        if module is None:
            raise InputSpecError(f"{name} runs the PyTorch model, and none was given here")
        parts = name.split("-")[1:]
        device = "cuda" if "cuda" in parts else "cpu"
        dtype = next((p for p in parts if p in ("fp16", "bf16")), "fp32")
        return TorchRunner(copy.deepcopy(module), [o.name for o in model.graph.output], device, dtype, fp32_modules)
    if name.startswith("ort"):
        return OrtRunner(model, "cuda" if name == "ort-cuda" else "cpu", ort_optimization)
    settings = dataclasses.replace(trt_settings or TrtSettings(), precision=name.partition("-")[2] or "fp32")
    return TrtRunner(model, profile or {}, settings)

