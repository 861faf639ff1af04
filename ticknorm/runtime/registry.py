"""Which runtimes exist on this machine, and runners built from a runtime name.

Names: `ort` / `ort-cpu`, `ort-cuda`, `trt` / `trt-fp16` / `trt-bf16`, and PyTorch itself as a
target: `torch-fp16`, `torch-bf16`, `torch-cuda[-fp16|-bf16]` (the reference is always fp32 CPU)."""

import copy
import importlib
from dataclasses import dataclass, field

import onnx

from ticknorm.base.errors import InputSpecError
from ticknorm.base.precision import LOW_TYPES, Precision, coarser
from ticknorm.runtime.base import Runner
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner
from ticknorm.runtime.torch_runner import TorchRunner
from ticknorm.runtime.trt_runner import TrtRunner, TrtSettings

RUNTIME_NAMES = ("torch", "ort", "ort-cpu", "ort-cuda", "trt", "trt-fp16", "trt-bf16",
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
class LowPrecision:
    """A low type's measured policy, and the graph converted with it for runtimes whose precision
    comes from the graph (TensorRT's strongly typed networks); None where none needs it."""

    policy: Precision
    graph: onnx.ModelProto | None = None


@dataclass(frozen=True)
class RunnerSetup:
    """What a runner needs besides its runtime's name and the graph: the PyTorch model (for the
    `torch-*` targets, judged against the fp32 CPU reference), TensorRT's shape profile, ONNX
    Runtime's optimization level, and per low type ('fp16', 'bf16') the precision it runs with."""

    module: object = None
    profile: dict | None = None
    ort_optimization: str = "all"
    low: dict = field(default_factory=dict)  # 'fp16' | 'bf16' -> LowPrecision
    model_file: str | None = None  # the file the graph was read from, which ONNX Runtime then reads itself
    weights_dir: str | None = None  # where a graph read without its weights finds them (`graph_only`)


@dataclass(frozen=True)
class TrtexecFiles:
    """What trtexec wrote on a target GPU (`ticknorm trtexec-command` prints the line): its
    --exportProfile JSON, and optionally its --exportLayerInfo JSON (layers -> ONNX nodes) and its
    console log (TensorRT version, GPU, precision flags, GPU compute time of the plain runs)."""

    profile: str
    layers: str | None = None
    log: str | None = None


@dataclass(frozen=True)
class Runtimes:
    """The runtimes a command runs, and how: ONNX Runtime's optimization level, and the precision
    policy low-precision targets (`trt-fp16`, `torch-bf16`, ...) measure their fp32 islands with
    (`keep_fp32` globs, the underflow limit)."""

    names: tuple = ("ort",)
    ort_optimization: str = "all"
    precision: Precision = Precision()
    trtexec: TrtexecFiles | None = None  # TensorRT timed by trtexec on a target GPU

    @classmethod
    def of(cls, value) -> "Runtimes":
        """A `Runtimes`, or runtime names as a list ('ort', 'trt-fp16', ...)."""
        return value if isinstance(value, Runtimes) else cls(tuple(value))


def runtime_precision(name: str, model: onnx.ModelProto, reference: str = "fp32") -> str:
    """The type a runtime computes in: its own suffix (`trt-fp16`, `torch-bf16`), else, for
    `torch*`, the PyTorch model's own (`reference`: its checkpoint's type), else the graph's."""
    suffix = name.rsplit("-", 1)[-1]
    if suffix in LOW_TYPES:
        return suffix
    return reference if name.startswith("torch") else Precision.of_graph(model).dtype


def judged_precision(name: str, model: onnx.ModelProto, reference: str = "fp32") -> str:
    """The type whose tolerance a runtime's outputs are judged at against a PyTorch reference
    computing in `reference`: the coarser of the two."""
    return coarser(runtime_precision(name, model, reference), reference)


FILE_READERS = ("torch", "torch-cuda", "ort", "ort-cpu", "ort-cuda")


def needs_weights(names) -> bool:
    """Whether running these runtimes needs the graph's weights in Python: TensorRT builds from
    the graph in memory, a low-precision target is planned on an fp32 run of it. PyTorch in fp32
    runs its own weights, and ONNX Runtime maps them from the files themselves
    (`RunnerSetup.model_file`, `weights_dir`), so a profile or a comparison on them reads the graph
    alone."""
    return any(name not in FILE_READERS for name in names)


def make_runner(name: str, model: onnx.ModelProto, setup: RunnerSetup = RunnerSetup(), taps=()) -> Runner:
    if name not in RUNTIME_NAMES:
        raise InputSpecError(f"unknown runtime '{name}'; choose from: {', '.join(RUNTIME_NAMES)}")
    precision = runtime_precision(name, model)
    if name.startswith("torch"):
        if setup.module is None:
            raise InputSpecError(f"{name} runs the PyTorch model, and none was given here")
        device = "cuda" if "cuda" in name.split("-") else "cpu"
        low = name.rsplit("-", 1)[-1] in LOW_TYPES  # else the model as loaded, in its checkpoint's type
        fp32_modules = setup.low[precision].policy.modules if low and precision in setup.low else ()
        return TorchRunner(copy.deepcopy(setup.module), [o.name for o in model.graph.output], device,
                           precision if low else None, fp32_modules, taps)
    if name.startswith("ort"):
        return OrtRunner(model, "cuda" if name == "ort-cuda" else "cpu", setup.ort_optimization, taps=taps,
                         model_file=setup.model_file,
                         mapped=MappedWeights(setup.weights_dir) if setup.weights_dir else None)
    return TrtRunner(_graph_in(precision, model, setup, name), setup.profile or {}, TrtSettings(precision), taps=taps)


def _graph_in(precision: str, model: onnx.ModelProto, setup: RunnerSetup, name: str) -> onnx.ModelProto:
    """The graph a strongly typed runtime builds for `precision`: the model itself when it is in
    that precision, else the one converted for it."""
    own = Precision.of_graph(model).dtype
    if own == precision:
        return model
    converted = setup.low.get(precision)
    if converted is None or converted.graph is None:
        raise InputSpecError(f"{name} builds a {precision} graph and this one is "
                             f"{own}: convert it first (ticknorm convert --precision "
                             f"{precision}), or run it through ticknorm compare/profile/report, which convert it")
    return converted.graph
