"""Profile a model on several runtimes and align the results per PyTorch module."""

from dataclasses import dataclass, field

import onnx

from ticknorm.base.errors import InputSpecError
from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.collect_ort import collect_ort
from ticknorm.profiler.collect_torch import collect_torch
from ticknorm.profiler.collect_trt import collect_trt
from ticknorm.profiler.ticks import ROOT, UNATTRIBUTED, TickLog, roll_up
from ticknorm.runtime.ort_runner import OrtRunner
from ticknorm.runtime.registry import make_runner
from ticknorm.runtime.torch_runner import TorchRunner
from ticknorm.runtime.trt_runner import TrtRunner


@dataclass
class ProfileResult:
    depth: int | None
    logs: dict = field(default_factory=dict)  # runtime -> TickLog
    order: list = field(default_factory=list)  # row keys in model order

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


def profile(model: onnx.ModelProto, module, feeds: dict, runtimes=("torch", "ort"), iterations: int = 20,
            warmup: int = 3, depth: int | None = None, profile_shapes: dict | None = None,
            on_iteration=lambda: None) -> ProfileResult:
    if iterations < 1 or warmup < 0:
        raise InputSpecError("--iterations must be at least 1 and --warmup at least 0")
    table = ScopeTable(model)
    result = ProfileResult(depth)
    result.order = list(dict.fromkeys(roll_up(m, depth) or ROOT for m in table.module_order))
    names = [o.name for o in model.graph.output]
    runners = {r: (TorchRunner(module, names) if r == "torch" else make_runner(r, model, profile_shapes, module=module))
               for r in runtimes}
    for runner in runners.values():
        runner.activate()
    for runtime, runner in runners.items():
        result.logs[runtime] = _collect(runner, feeds, iterations, warmup, depth, table, on_iteration)
    return result


def _collect(runner, feeds, iterations, warmup, depth, table, on_iteration) -> TickLog:
    if isinstance(runner, TorchRunner):
        return collect_torch(runner, feeds, iterations, warmup, depth, on_iteration)
    if isinstance(runner, OrtRunner):
        return collect_ort(runner, feeds, iterations, warmup, table, on_iteration)
    if isinstance(runner, TrtRunner):
        return collect_trt(runner, feeds, iterations, warmup, table, on_iteration)
    raise InputSpecError(f"{runner.name} cannot be profiled")
