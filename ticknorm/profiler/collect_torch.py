"""PyTorch eager: forward pre/post hooks on every module, the root included.

Each stretch of time goes to the innermost module running then (its own ops, outside any child):
a module that computes with its own weights (`nn.MultiheadAttention`, whose `out_proj` never runs
as a module) has a figure like any other, and rolling up to a depth sums a module's own time and
its children's, so a module's time excludes nothing that ran inside it. ONNX Runtime's rows are
the same: each node's time goes to its scope and rolls up.

Host clock on CPU; CUDA events on GPU, read once per iteration (no synchronization per module).
Plain and hooked iterations alternate in blocks (`ticks.blocks`): the plain figure is what a
deployment sees, and the hooks' cost is reported as the overhead, never subtracted from a module.
No run is made only to check the model: the feeds are checked without one, and every run's
outputs against the graph's."""

import time

from ticknorm.base.optional import require
from ticknorm.profiler.ticks import Span, Tick, TickLog, blocks
from ticknorm.runtime.torch_runner import TorchRunner, forward


def collect_torch(runner: TorchRunner, feeds: dict, timing, table, on_iteration=lambda: None) -> TickLog:
    """`feeds` as the module takes them; `table` (the graph's scopes, which the ONNX runtimes'
    collectors map their nodes with) is not needed: the hooks name the modules themselves."""
    with runner:
        return _timed(runner, feeds, timing, on_iteration)


def _timed(runner: TorchRunner, feeds: dict, timing, on_iteration) -> TickLog:
    torch = require("torch", "torch")
    cuda = runner.device.startswith("cuda")
    clock = "cuda" if cuda else "host"
    log = TickLog(runner.name, clock, iterations=timing.iterations)

    runner.check(feeds)
    tensors = runner.tensors(feeds)

    def run() -> int:
        """One forward, timed; what it returns is checked against the graph's outputs after."""
        start = time.perf_counter_ns()
        result = forward(runner.module, tensors)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter_ns() - start
        runner.graph_outputs(result)
        return elapsed

    marks: list = []
    for _ in range(timing.warmup):
        run()
    for block in blocks(timing.iterations):
        if block.start and timing.settles:
            run()
        for _ in block:
            log.end_to_end_ns.append(run())
            on_iteration()
        handles = _attach(torch, runner.module, marks, cuda)
        try:
            if timing.settles:
                run()
            for iteration in block:
                marks.clear()
                log.instrumented_ns.append(run())
                log.spans.extend(own_time(_stamps(marks, cuda), iteration, clock))
                on_iteration()
        finally:
            for handle in handles:
                handle.remove()
    return log


def _attach(torch, module, marks: list, cuda: bool) -> list:
    handles = []
    for path, submodule in module.named_modules():
        handles.append(submodule.register_forward_pre_hook(_mark(torch, marks, path, "begin", cuda)))
        handles.append(submodule.register_forward_hook(_mark(torch, marks, path, "end", cuda)))
    return handles


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


Mark = tuple[str, str, int]  # (module path, 'begin' or 'end', stamp in ns)


def _stamps(marks: list, cuda: bool) -> list[Mark]:
    """Marks with nanosecond stamps (CUDA events: relative to the iteration's first event)."""
    if not cuda or not marks:
        return marks
    first = marks[0][2]
    return [(path, edge, int(first.elapsed_time(event) * 1e6)) for path, edge, event in marks]


def own_time(marks: list[Mark], iteration: int, clock: str) -> list[Span]:
    """Non-overlapping spans, each given to the innermost module running: a parent's span stops
    where a child starts and resumes where it ends."""
    spans: list[Span] = []
    running: list[str] = []  # the modules begun and not ended, innermost last
    since = 0  # the last mark, where the innermost module's current stretch began
    for path, edge, stamp in marks:
        if running and since < stamp:
            spans.append(Span(running[-1], (running[-1],), iteration, Tick(clock, since), Tick(clock, stamp)))
        if edge == "begin":
            running.append(path)
        elif running:
            running.pop()
        since = stamp
    return spans
