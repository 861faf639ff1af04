"""Which runtimes exist on this machine, and runners built from a runtime name.

Names: `ort` / `ort-cpu`, `ort-cuda`, `trt` / `trt-fp16` / `trt-bf16`, and PyTorch itself as a
target: `torch-fp16`, `torch-bf16`, `torch-cuda[-fp16|-bf16]` (the reference is always fp32 CPU)."""

import copy
import importlib
from dataclasses import dataclass

import onnx

from ticknorm.base.errors import InputSpecError
from ticknorm.base.precision import Precision
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


@dataclass(frozen=True)
class RunnerSetup:
    """What a runner needs besides its runtime's name and the graph: the PyTorch model (for the
    `torch-*` targets, judged against the fp32 CPU reference), TensorRT's shape profile, ONNX
    Runtime's optimization level, and the precision policy of low-precision targets."""

    module: object = None
    profile: dict | None = None
    ort_optimization: str = "all"
    precision: Precision = Precision()


def make_runner(name: str, model: onnx.ModelProto, setup: RunnerSetup = RunnerSetup(), taps=()) -> Runner:
    if name not in RUNTIME_NAMES:
        raise InputSpecError(f"unknown runtime '{name}'; choose from: {', '.join(RUNTIME_NAMES)}")
    if name.startswith("torch"):
        if setup.module is None:
            raise InputSpecError(f"{name} runs the PyTorch model, and none was given here")
        parts = name.split("-")[1:]
        device = "cuda" if "cuda" in parts else "cpu"
        dtype = next((p for p in parts if p in ("fp16", "bf16")), "fp32")
        fp32_modules = setup.precision.modules if dtype != "fp32" else ()
        return TorchRunner(copy.deepcopy(setup.module), [o.name for o in model.graph.output], device, dtype,
                           fp32_modules, taps)
    if name.startswith("ort"):
        return OrtRunner(model, "cuda" if name == "ort-cuda" else "cpu", setup.ort_optimization, taps=taps)
    precision = name.partition("-")[2] or "fp32"
    settings = TrtSettings(precision, setup.precision.nodes if precision != "fp32" else [])
    return TrtRunner(model, setup.profile or {}, settings, taps=taps)
