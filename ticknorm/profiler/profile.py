"""Profile a model on several runtimes and align the results per PyTorch module."""

import contextlib
import gc
import importlib
from dataclasses import dataclass, field

import onnx

from ticknorm.base.errors import InputSpecError, RuntimeUnavailable
from ticknorm.base.progress import QUIET, Progress
from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.ticks import ROOT, UNATTRIBUTED, TickLog, roll_up
from ticknorm.runtime.registry import RunnerSetup, make_runner, runtime_kind
from ticknorm.runtime.torch_runner import TorchRunner


@dataclass(frozen=True)
class Timing:
    """How a profile is taken: timed iterations after dropped warm-up ones, modules rolled up to
    `depth` path segments (None: every leaf)."""

    iterations: int = 20
    warmup: int = 3
    depth: int | None = None

    @property
    def settles(self) -> bool:
        """Whether each block after a block of the other kind (plain, instrumented) starts with one
        untimed run (ONNX Runtime: runs for a few ms), as the other kind's runs left their caches
        and pools. With no warm-up nothing runs untimed: every run is timed, the first one cold,
        as asked."""
        return self.warmup > 0


@dataclass
class ProfileResult:
    depth: int | None
    logs: dict[str, TickLog] = field(default_factory=dict)  # by runtime
    order: list[str] = field(default_factory=list)  # row keys in model order

    def rows(self) -> list[tuple[str, dict]]:
        """(module, {runtime: ModuleTiming}) in model order; group rows and (unattributed) last."""
        timings = {runtime: log.per_module(self.depth) for runtime, log in self.logs.items()}
        keys = list(self.order)
        for per_runtime in timings.values():
            keys += [k for k in per_runtime if k not in keys and k != UNATTRIBUTED]
        if any(UNATTRIBUTED in t for t in timings.values()):
            keys.append(UNATTRIBUTED)
        return [(key, {r: t[key] for r, t in timings.items() if key in t}) for key in keys
                if any(key in t for t in timings.values())]


def profile_runtimes(model: onnx.ModelProto, feeds: dict, runtimes, setup: RunnerSetup, timing: Timing = Timing(),
                     progress: Progress = QUIET) -> ProfileResult:
    """Every runtime timed per module, one after the other (`torch` is `setup.module` itself).
    Every runtime is checked for availability before any of them is timed."""
    if timing.iterations < 1 or timing.warmup < 0:
        raise InputSpecError("--iterations must be at least 1 and --warmup at least 0")
    table = ScopeTable(model)
    result = ProfileResult(timing.depth)
    result.order = list(dict.fromkeys(roll_up(m, timing.depth) or ROOT for m in table.module_order))
    names = [o.name for o in model.graph.output]
    runners = {r: TorchRunner(setup.module, names) if r == "torch" else make_runner(r, model, setup) for r in runtimes}
    for runner in runners.values():
        runner.check_available()
        if getattr(runner, "emulates_bf16", False):
            raise RuntimeUnavailable(f"{runner.name}: ONNX Runtime's CPU provider has no bf16 kernels, and timing the "
                                     "graph's fp32 emulation (what compare checks there) says nothing of a bf16 "
                                     "deployment: profile it with ort-cuda or trt-bf16, or profile its fp32 export")
    with _collector_paused():
        _collect(result, runners, feeds, timing, table, progress)
    return result


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while runtimes are timed, as `timeit` does: a full
    collection walks every object alive (a model's modules and parameters) and would land inside
    whichever run allocated the object that triggered it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _collect(result: ProfileResult, runners: dict, feeds: dict, timing: Timing, table: ScopeTable,
             progress: Progress) -> None:
    """Each runner timed by its kind's collector, which feeds it what it takes (an ONNX graph's
    runner: `graph_feeds`)."""
    for runtime, runner in runners.items():
        progress.step(f"timing {runtime}: {timing.iterations} plain and {timing.iterations} instrumented iterations, "
                      "in alternating blocks")
        collect = _collector(runtime_kind(runtime).collector)
        result.logs[runtime] = collect(runner, feeds, timing, table, progress.advance)


def _collector(key: str):
    """The collector a runtime kind names (`RuntimeKind.collector`): `collect_<key>` in module
    `ticknorm.profiler.collect_<key>`. The kinds sit below the profiler and cannot import it; one
    naming rule here, rather than a map, lets a runtime with a collector of its own be added
    without touching this file. Imported when used: TensorRT's is loaded only to time TensorRT."""
    return getattr(importlib.import_module(f"ticknorm.profiler.collect_{key}"), f"collect_{key}")
