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
    """`runner` says what to run (model, provider, optimization); two runners like it are timed:
    a plain one and one with ONNX Runtime's profiler on, both with pool threads that stop
    spinning when a run returns."""
    log = TickLog(runner.name, "runtime", iterations=timing.iterations)
    with tempfile.TemporaryDirectory() as workdir:
        def options(profiling: bool):
            def make():
                made = runner.session_options()
                # The plain and the profiling session run in turn: pool threads still spinning after
                # one session's run would take the cores from the other's and make both noisy. They
                # spin during a run as usual, and stop when it returns.
                made.add_session_config_entry("session.force_spinning_stop", "1")
                if profiling:
                    made.enable_profiling = True
                    made.profile_file_prefix = os.path.join(workdir, "ort")
                    made.optimized_model_filepath = os.path.join(workdir, "optimized.onnx")
                return made
            return make

        with runner.variant(options(False)) as plain_runner, runner.variant(options(True)) as profiling_runner:
            plain_runner.infer(feeds)  # checks the feeds against the model before anything is timed
            table.learn_rewritten(runner.model, onnx.load(os.path.join(workdir, "optimized.onnx"), load_external_data=False))
            events = _timed(plain_runner.session, profiling_runner.session, feeds, timing, log, on_iteration)
    log.spans = _spans(events, timing.warmup, timing.iterations, table)
    return log


def _timed(plain, profiling, feeds: dict, timing, log: TickLog, on_iteration) -> list:
    """Time the plain session into `log`, and return the profiling session's events."""
    for _ in range(timing.warmup):
        plain.run(None, feeds)
        profiling.run(None, feeds)
    for _ in range(timing.iterations):  # alternating, so drift in machine load hits both alike
        start = time.perf_counter_ns()
        plain.run(None, feeds)
        log.end_to_end_ns.append(time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        profiling.run(None, feeds)
        log.instrumented_ns.append(time.perf_counter_ns() - start)
        on_iteration()
    with open(profiling.end_profiling()) as handle:
        return json.load(handle)


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
