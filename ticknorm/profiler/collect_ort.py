"""ONNX Runtime: its built-in profiler (`enable_profiling`), node events parsed per run."""

import json
import os
import tempfile
import time

import onnx

from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.ticks import Span, Tick, TickLog
from ticknorm.runtime.ort_runner import OrtRunner

_RUN_EVENTS = ("model_run", "SequentialExecutor::Execute")


def collect_ort(runner: OrtRunner, feeds: dict, timing, table: ScopeTable, on_iteration=lambda: None) -> TickLog:
    """`runner`'s plain session is timed on its own first, as a deployment runs it; then a session
    like it with ONNX Runtime's profiler on runs the instrumented iterations. One session at a time
    holds the model."""
    log = TickLog(runner.name, "runtime", iterations=timing.iterations)
    with runner:
        runner.infer(feeds)  # checks the feeds against the model before anything is timed
        log.end_to_end_ns = _times(runner.session, feeds, timing, on_iteration)
    with tempfile.TemporaryDirectory() as workdir:
        def profiling_options():
            made = runner.session_options()
            made.enable_profiling = True
            made.profile_file_prefix = os.path.join(workdir, "ort")
            made.optimized_model_filepath = os.path.join(workdir, "optimized.onnx")
            return made

        with runner.variant(profiling_options) as profiling:
            table.learn_rewritten(runner.model, onnx.load(os.path.join(workdir, "optimized.onnx"), load_external_data=False))
            log.instrumented_ns = _times(profiling.session, feeds, timing, on_iteration)
            with open(profiling.session.end_profiling()) as handle:
                events = json.load(handle)
    log.spans = _spans(events, timing.warmup, timing.iterations, table)
    return log


def _times(session, feeds: dict, timing, on_iteration=lambda: None) -> list[int]:
    """Nanoseconds per timed run, after the warm-up runs."""
    for _ in range(timing.warmup):
        session.run(None, feeds)
    times = []
    for _ in range(timing.iterations):
        start = time.perf_counter_ns()
        session.run(None, feeds)
        times.append(time.perf_counter_ns() - start)
        on_iteration()
    return times


def _spans(events: list, warmup: int, iterations: int, table: ScopeTable) -> list[Span]:
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") in _RUN_EVENTS),
                  key=lambda e: e["ts"])
    kind = next((name for name in _RUN_EVENTS if any(r["name"] == name for r in runs)), None)
    runs = [r for r in runs if r["name"] == kind][warmup:warmup + iterations]
    spans = []
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    for iteration, run in enumerate(runs):
        end = run["ts"] + run["dur"]
        for event in nodes:
            if run["ts"] <= event["ts"] <= end:
                name = event["name"].removesuffix("_kernel_time")
                begin = event["ts"] * 1000
                spans.append(Span(name, table.modules_for_ort(name), iteration, Tick("runtime", begin),
                                  Tick("runtime", begin + event["dur"] * 1000)))
    return spans
