"""PyTorch eager: forward pre/post hooks on the modules at the chosen depth.

Host clock on CPU; CUDA events on GPU, read once per iteration (no synchronization per layer).
The hooks cost time themselves: end-to-end time is measured with and without them, and the
difference is reported as the overhead, never subtracted from a module."""

import time

from ticknorm.base.optional import require
from ticknorm.profiler.ticks import Span, Tick, TickLog
from ticknorm.runtime.torch_runner import TorchRunner


def hooked_modules(module, depth: int | None) -> list[str]:
    """Modules at exactly `depth` path segments, plus shallower leaves (nothing deeper to hook)."""
    chosen = []
    for path, child in module.named_modules():
        if not path:
            continue
        level = len(path.split("."))
        leaf = not any(True for _ in child.children())
        if depth is None and leaf or depth is not None and (level == depth or (level < depth and leaf)):
            chosen.append(path)
    return chosen


def collect_torch(runner: TorchRunner, feeds: dict, timing, on_iteration=lambda: None) -> TickLog:
    with runner:
        return _timed(runner, feeds, timing, on_iteration)


def _timed(runner: TorchRunner, feeds: dict, timing, on_iteration) -> TickLog:
    torch = require("torch", "torch")
    cuda = runner.device.startswith("cuda")
    log = TickLog(runner.name, "cuda" if cuda else "host", iterations=timing.iterations)

    def run():
        runner.infer(feeds)
        if cuda:
            torch.cuda.synchronize()

    paths = hooked_modules(runner.module, timing.depth)
    marks: list = []

    def attach():
        handles = []
        for path in paths:
            submodule = runner.module.get_submodule(path)
            handles.append(submodule.register_forward_pre_hook(_mark(torch, marks, path, "begin", cuda)))
            handles.append(submodule.register_forward_hook(_mark(torch, marks, path, "end", cuda)))
        return handles

    # Plain and hooked iterations alternate, so drift in machine load hits both alike.
    for iteration in range(-timing.warmup, timing.iterations):
        start = time.perf_counter_ns()
        run()
        plain = time.perf_counter_ns() - start
        handles = attach()
        marks.clear()
        try:
            start = time.perf_counter_ns()
            run()
            hooked = time.perf_counter_ns() - start
        finally:
            for handle in handles:
                handle.remove()
        if iteration >= 0:
            log.end_to_end_ns.append(plain)
            log.instrumented_ns.append(hooked)
            log.spans.extend(_pair(marks, iteration, cuda))
            on_iteration()
    return log


def _mark(torch, marks: list, path: str, edge: str, cuda: bool):
    if cuda:
        def hook(*_args):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append((path, edge, event))
    else:
        def hook(*_args):
            marks.append((path, edge, time.perf_counter_ns()))
    return hook


def _pair(marks: list, iteration: int, cuda: bool) -> list[Span]:
    spans, open_marks = [], {}
    first = marks[0][2] if marks else None
    for path, edge, stamp in marks:
        if edge == "begin":
            open_marks.setdefault(path, []).append(stamp)
            continue
        begin = open_marks[path].pop()
        if cuda:  # elapsed_time is in ms relative to the first event of the iteration
            begin_ns, end_ns = int(first.elapsed_time(begin) * 1e6), int(first.elapsed_time(stamp) * 1e6)
        else:
            begin_ns, end_ns = begin, stamp
        clock = "cuda" if cuda else "host"
        spans.append(Span(path, (path,), iteration, Tick(clock, begin_ns), Tick(clock, end_ns)))
    return spans
