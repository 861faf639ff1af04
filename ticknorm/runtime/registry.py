"""Which runtimes exist on this machine, and runners built from a runtime name: `KINDS` holds one
`RuntimeKind` per kind of runtime, and every question asked of a runtime's name is answered from it.

Names: `ort` / `ort-cpu`, `ort-cuda`, `trt` / `trt-fp16` / `trt-bf16`, and PyTorch itself as a
target: `torch-fp16`, `torch-bf16`, `torch-cuda[-fp16|-bf16]` (the reference is always fp32 CPU)."""

import copy
import importlib
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import onnx

from ticknorm.base.errors import InputSpecError
from ticknorm.base.precision import LOW_TYPES, Precision, coarser
from ticknorm.runtime.base import Runner
from ticknorm.runtime.kind import RunnerRequest, RuntimeKind, RuntimeStatus
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner
from ticknorm.runtime.torch_runner import TorchRunner
from ticknorm.runtime.trt_runner import ShapeProfile, TrtRunner, TrtSettings

if TYPE_CHECKING:
    from torch import nn


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

    module: "nn.Module | None" = None
    profile: ShapeProfile | None = None
    ort_optimization: str = "all"
    low: dict[str, LowPrecision] = field(default_factory=dict)  # by low type: 'fp16', 'bf16'
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

    names: tuple[str, ...] = ("ort",)
    ort_optimization: str = "all"
    precision: Precision = Precision()
    trtexec: TrtexecFiles | None = None  # TensorRT timed by trtexec on a target GPU

    @classmethod
    def of(cls, value) -> "Runtimes":
        """A `Runtimes`, or runtime names as a list ('ort', 'trt-fp16', ...)."""
        return value if isinstance(value, Runtimes) else cls(tuple(value))


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def _cuda() -> bool:
    """Whether torch sees a CUDA device: what every GPU runtime's status asks first."""
    if not _version("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def _ort_providers() -> list[str]:
    if not _version("onnxruntime"):
        return []
    import onnxruntime

    return onnxruntime.get_available_providers()


def _torch_status(name: str) -> RuntimeStatus:
    version = _version("torch")
    return RuntimeStatus(name, version or "-", bool(version),
                         "" if version else "torch is not installed (pip install 'ticknorm[torch]')")


def _torch_cuda_status(name: str) -> RuntimeStatus:
    cuda = _cuda()
    return RuntimeStatus(name, _version("torch") or "-", cuda, "" if cuda else "no CUDA device visible to torch")


def _ort_cpu_status(name: str) -> RuntimeStatus:
    version = _version("onnxruntime")
    return RuntimeStatus(name, version or "-", "CPUExecutionProvider" in _ort_providers(),
                         "" if version else "onnxruntime is not installed")


def _ort_cuda_status(name: str) -> RuntimeStatus:
    return _on_cuda(name, _version("onnxruntime"), "CUDAExecutionProvider" in _ort_providers(),
                    "this onnxruntime build has no CUDAExecutionProvider (pip install 'ticknorm[gpu]')")


def _trt_status(name: str) -> RuntimeStatus:
    version = _version("tensorrt")
    return _on_cuda(name, version, bool(version), "tensorrt is not installed (pip install 'ticknorm[trt]')")


def _on_cuda(name: str, version: str | None, present: bool, missing: str) -> RuntimeStatus:
    """A GPU runtime's status: available where it is `present` and torch sees a CUDA device; else
    the missing piece (`missing` says how to get the runtime)."""
    cuda = _cuda()
    return RuntimeStatus(name, version or "-", present and cuda,
                         "" if present and cuda else ("no CUDA device" if present else missing))


def _torch_runner(device: str, request: RunnerRequest) -> Runner:
    """The PyTorch model on `device`, a copy of it (a low type casts it), in a low type with the
    fp32 islands its policy keeps, or else as loaded (in its checkpoint's type)."""
    setup = request.setup
    if setup.module is None:
        raise InputSpecError(f"{request.name} runs the PyTorch model, and none was given here")
    fp32_modules = setup.low[request.low].policy.modules if request.low in setup.low else ()
    return TorchRunner(copy.deepcopy(setup.module), [o.name for o in request.model.graph.output], device,
                       request.low, fp32_modules, request.taps)


def _ort_runner(provider: str, request: RunnerRequest) -> Runner:
    setup = request.setup
    return OrtRunner(request.model, provider, setup.ort_optimization, taps=request.taps, model_file=setup.model_file,
                     mapped=MappedWeights(setup.weights_dir) if setup.weights_dir else None)


def _trt_runner(request: RunnerRequest) -> Runner:
    return TrtRunner(_graph_in(request), request.setup.profile or {}, TrtSettings(request.precision), taps=request.taps)


LOWS = tuple(LOW_TYPES)
# One row per kind of runtime, in the order `ticknorm runtimes` lists them. A runtime added here
# (with its runner and, for `profile`, its collector module) is known to every command.
KINDS = (
    RuntimeKind("torch", ("torch",), _torch_status, partial(_torch_runner, "cpu"), "torch", reads_file=True,
                low_types=LOWS, runs_module=True),
    RuntimeKind("torch-cuda", ("torch-cuda",), _torch_cuda_status, partial(_torch_runner, "cuda"), "torch",
                reads_file=True, low_types=LOWS, runs_module=True),
    RuntimeKind("ort-cpu", ("ort", "ort-cpu"), _ort_cpu_status, partial(_ort_runner, "cpu"), "ort", reads_file=True),
    RuntimeKind("ort-cuda", ("ort-cuda",), _ort_cuda_status, partial(_ort_runner, "cuda"), "ort", reads_file=True),
    RuntimeKind("trt", ("trt",), _trt_status, _trt_runner, "trt", low_types=LOWS, converts_graph=True),
)


def runtime_names() -> list[str]:
    return [name for kind in KINDS for name in kind.accepted]


def runtime_patterns() -> str:
    """Every name, as `--runtime` help lists them."""
    return ", ".join(kind.pattern for kind in KINDS)


def _lookup(name: str) -> RuntimeKind | None:
    return next((kind for kind in KINDS if name in kind.accepted), None)


def runtime_kind(name: str) -> RuntimeKind:
    kind = _lookup(name)
    if kind is None:
        raise InputSpecError(f"unknown runtime '{name}'; choose from: {', '.join(runtime_names())}")
    return kind


def runtime_statuses() -> list[RuntimeStatus]:
    return [kind.status(kind.name) for kind in KINDS]


def runtime_precision(name: str, model: onnx.ModelProto, reference: str = "fp32") -> str:
    """The type a runtime computes in: its own suffix (`trt-fp16`, `torch-bf16`), else, for a
    kind that runs the PyTorch model, the model's own (`reference`: its checkpoint's type), else
    the graph's (also for a name no kind answers to, which `make_runner` then refuses)."""
    kind = _lookup(name)
    suffix = kind.accepted[name] if kind else None
    if suffix:
        return suffix
    return reference if kind and kind.runs_module else Precision.of_graph(model).dtype


def runs_module(name: str) -> bool:
    """Whether a runtime runs the PyTorch model rather than the exported graph (`torch-*`)."""
    kind = _lookup(name)
    return kind is not None and kind.runs_module


def converts_graph(name: str) -> bool:
    """Whether a runtime runs its low type on the graph converted to it (TensorRT)."""
    kind = _lookup(name)
    return kind is not None and kind.converts_graph


def judged_precision(name: str, model: onnx.ModelProto, reference: str = "fp32") -> str:
    """The type whose tolerance a runtime's outputs are judged at against a PyTorch reference
    computing in `reference`: the coarser of the two."""
    return coarser(runtime_precision(name, model, reference), reference)


def needs_weights(names) -> bool:
    """Whether running these runtimes needs the graph's weights in Python: TensorRT builds from
    the graph in memory, a low-precision target is planned on an fp32 run of it. PyTorch in fp32
    runs its own weights, and ONNX Runtime maps them from the files themselves
    (`RunnerSetup.model_file`, `weights_dir`), so a profile or a comparison on them reads the graph
    alone (`RuntimeKind.reads_file`)."""
    return any(_needs_weights(name) for name in names)


def _needs_weights(name: str) -> bool:
    kind = _lookup(name)
    return kind is None or kind.accepted[name] is not None or not kind.reads_file


def make_runner(name: str, model: onnx.ModelProto, setup: RunnerSetup = RunnerSetup(), taps=()) -> Runner:
    kind = runtime_kind(name)
    request = RunnerRequest(name, kind.accepted[name], runtime_precision(name, model), model, setup, taps)
    return kind.runner(request)


def _graph_in(request: RunnerRequest) -> onnx.ModelProto:
    """The graph a strongly typed runtime builds for its precision: the model itself when it is in
    that precision, else the one converted for it."""
    model, precision = request.model, request.precision
    own = Precision.of_graph(model).dtype
    if own == precision:
        return model
    converted = request.setup.low.get(precision)
    if converted is None or converted.graph is None:
        raise InputSpecError(f"{request.name} builds a {precision} graph and this one is "
                             f"{own}: convert it first (ticknorm convert --precision "
                             f"{precision}), or run it through ticknorm compare/profile/report, which convert it")
    return converted.graph
