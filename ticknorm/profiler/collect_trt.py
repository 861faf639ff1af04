"""TensorRT: an IProfiler receives each layer's time after every execution.

Fused layers (`a + b`) and Myelin regions (`{ForeignNode[a...b]}`) map to every module they
cover and become group rows. NOT VERIFIED on TensorRT (none on this project's machines); the
name mapping it relies on (`ScopeTable.modules_for_trt`) is unit-tested, and so is its loop (blocks,
settling runs, the profiler attached to profiled runs only, GPU compute kept apart) with TensorRT's
IProfiler and an engine stood in for."""

import time

from ticknorm.base.inputs import graph_feeds
from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.ticks import Span, Tick, TickLog, blocks
from ticknorm.runtime.trt_runner import TrtRunner, import_tensorrt


def collect_trt(runner: TrtRunner, feeds: dict, timing, table: ScopeTable, on_iteration=lambda: None) -> TickLog:
    with runner:
        return _timed(runner, graph_feeds(runner.model, feeds), timing, table, on_iteration)


def _timed(runner: TrtRunner, feeds: dict, timing, table: ScopeTable, on_iteration) -> TickLog:
    """Plain and profiled runs alternate in blocks (`ticks.blocks`), each after one untimed run
    (`Timing.settles`)."""
    import_tensorrt()  # a missing or unsupported TensorRT is one line
    from tensorrt import IProfiler

    log = TickLog(runner.name, "runtime", iterations=timing.iterations)

    class LayerTimes(IProfiler):
        def __init__(self):
            IProfiler.__init__(self)
            self.reports: list[tuple[str, float]] = []  # (layer name, ms), in the order TensorRT reported them

        def report_layer_time(self, layer_name, ms):
            self.reports.append((layer_name, ms))

    profiler = LayerTimes()
    for _ in range(timing.warmup):
        runner.infer(feeds)
    try:
        for block in blocks(timing.iterations):
            runner.context.profiler = None
            if timing.settles:
                runner.infer(feeds)
            for _ in block:
                log.end_to_end_ns.append(_elapsed(runner, feeds))  # with the host<->device copies
                log.device_ns.append(runner.compute_ns)  # execute_async_v3 alone: trtexec's GPU compute time
                on_iteration()
            runner.context.profiler = profiler
            if timing.settles:
                runner.infer(feeds)
            for iteration in block:
                profiler.reports.clear()
                log.instrumented_ns.append(_elapsed(runner, feeds))
                log.spans += _layer_spans(profiler.reports, iteration, table)
                on_iteration()
    finally:
        runner.context.profiler = None
    return log


def _elapsed(runner: TrtRunner, feeds: dict) -> int:
    start = time.perf_counter_ns()
    runner.infer(feeds)
    return time.perf_counter_ns() - start


def _layer_spans(reports: list[tuple[str, float]], iteration: int, table: ScopeTable) -> list[Span]:
    """TensorRT reports durations only: the layers laid end to end, in the order it reported them."""
    spans, cursor = [], 0
    for name, ms in reports:
        duration = int(ms * 1e6)
        spans.append(Span(name, table.modules_for_trt(name), iteration, Tick("runtime", cursor),
                          Tick("runtime", cursor + duration)))
        cursor += duration
    return spans
