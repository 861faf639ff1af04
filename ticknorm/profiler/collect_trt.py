"""TensorRT: an IProfiler receives each layer's time after every execution.

Fused layers (`a + b`) and Myelin regions (`{ForeignNode[a...b]}`) map to every module they
cover and become group rows. NOT VERIFIED on TensorRT (none on this project's machines); the
name mapping it relies on (`ScopeTable.modules_for_trt`) is unit-tested."""

import time

from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.ticks import Span, Tick, TickLog
from ticknorm.runtime.trt_runner import TrtRunner, import_tensorrt


def collect_trt(runner: TrtRunner, feeds: dict, timing, table: ScopeTable, on_iteration=lambda: None) -> TickLog:
    with runner:
        return _timed(runner, feeds, timing, table, on_iteration)


def _timed(runner: TrtRunner, feeds: dict, timing, table: ScopeTable, on_iteration) -> TickLog:
    trt = import_tensorrt()
    iterations, warmup = timing.iterations, timing.warmup
    log = TickLog(runner.name, "runtime", iterations=iterations)
    for _ in range(warmup):
        runner.infer(feeds)
    for _ in range(iterations):  # plain iterations in a block of their own, then the instrumented ones
        start = time.perf_counter_ns()
        runner.infer(feeds)
        log.end_to_end_ns.append(time.perf_counter_ns() - start)  # with the host<->device copies
        log.device_ns.append(runner.compute_ns)  # execute_async_v3 alone, between CUDA events: trtexec's GPU compute
        on_iteration()

    class LayerTimes(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)
            self.reports = []

        def report_layer_time(self, layer_name, ms):
            self.reports.append((layer_name, ms))

    profiler = LayerTimes()
    runner.context.profiler = profiler
    try:
        for iteration in range(-warmup, iterations):
            profiler.reports.clear()
            start = time.perf_counter_ns()
            runner.infer(feeds)
            elapsed = time.perf_counter_ns() - start
            if iteration < 0:
                continue
            log.instrumented_ns.append(elapsed)
            cursor = 0
            for name, ms in profiler.reports:
                duration = int(ms * 1e6)
                log.spans.append(Span(name, table.modules_for_trt(name), iteration, Tick("runtime", cursor),
                                      Tick("runtime", cursor + duration)))
                cursor += duration
            on_iteration()
    finally:
        runner.context.profiler = None
    return log
