"""What one kind of runtime is, in one place: the names it answers to, whether it can run here
and why not, how its runner is built, how the profiler times it, what it reads and the type it
computes in. `registry.KINDS` holds one per kind, and the commands ask it rather than the names."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

from ticknorm.runtime.base import Runner

if TYPE_CHECKING:
    from ticknorm.runtime.registry import RunnerSetup  # registry builds its kinds from this module


@dataclass
class RuntimeStatus:
    name: str
    version: str
    available: bool
    reason: str = ""


@dataclass(frozen=True)
class RunnerRequest:
    """What a kind's runner factory is given: the name asked for (its errors say it), the type a
    low-precision suffix asks for (`trt-fp16` -> 'fp16'; None: the kind's own), the type the
    runtime computes in, the graph, the command's `RunnerSetup`, and the taps."""

    name: str
    low: str | None
    precision: str
    model: onnx.ModelProto
    setup: "RunnerSetup"
    taps: tuple[str, ...] = ()


@dataclass(frozen=True)
class RuntimeKind:
    """One kind of runtime. `names` are the names it answers to, each also with a `-<low type>`
    suffix for each of `low_types` (`trt` -> `trt-fp16`, `trt-bf16`); `name` is its row in
    `ticknorm runtimes`. `status(name)` says whether it runs here and, if not, why. `collector` is
    the key the profiler times its runners by (the profiler sits above the runtimes, so the kind
    names its collector and the profiler resolves it). `reads_file`: it runs the ONNX file's
    weights as they are on disk (ONNX Runtime maps them, PyTorch has its own), so a command on it
    reads the graph alone; a low type never does, as it is planned on an fp32 run of the weights.
    `runs_module`: it runs the PyTorch model, not the graph (so without a suffix it computes in the
    model's type, its checkpoint's). `converts_graph`: a low type runs the graph converted to that
    type (TensorRT builds strongly typed networks), not the fp32 graph with a policy."""

    name: str
    names: tuple[str, ...]
    status: Callable[[str], RuntimeStatus]
    runner: Callable[[RunnerRequest], Runner]
    collector: str
    reads_file: bool = False
    low_types: tuple[str, ...] = ()
    runs_module: bool = False
    converts_graph: bool = False

    @property
    def accepted(self) -> dict[str, str | None]:
        """Every name this kind answers to -> the low type its suffix asks for (None: none)."""
        return {f"{base}-{low}" if low else base: low for base in self.names for low in (None, *self.low_types)}

    @property
    def pattern(self) -> str:
        """Its names as `--runtime` help shows them: `trt[-fp16|-bf16]`."""
        suffixes = f"[{'|'.join(f'-{low}' for low in self.low_types)}]" if self.low_types else ""
        return ", ".join(base + suffixes for base in self.names)
