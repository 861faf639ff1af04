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


def collect_ort(runner: OrtRunner, feeds: dict, iterations: int, warmup: int, table: ScopeTable,
                on_iteration=lambda: None) -> TickLog:
    log = TickLog(runner.name, "runtime", iterations=iterations)
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

        plain_runner = OrtRunner(runner.model, runner.provider, runner.optimization, session_options=options(False))
        plain_runner.infer(feeds)  # checks the feeds against the model before anything is timed
        # `runner`'s own session is timed by neither loop: free its copy of the weights (it
        # reactivates on its next use) while the plain and the profiling session hold theirs.
        runner.deactivate()
        plain = plain_runner.session()
        session = OrtRunner(runner.model, runner.provider, runner.optimization, session_options=options(True)).session()
        table.learn_rewritten(runner.model, onnx.load(os.path.join(workdir, "optimized.onnx"), load_external_data=False))
        for _ in range(warmup):
            plain.run(None, feeds)
            session.run(None, feeds)
        for _ in range(iterations):  # alternating, so drift in machine load hits both alike
            start = time.perf_counter_ns()
            plain.run(None, feeds)
            log.end_to_end_ns.append(time.perf_counter_ns() - start)
            start = time.perf_counter_ns()
            session.run(None, feeds)
            log.instrumented_ns.append(time.perf_counter_ns() - start)
            on_iteration()
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    log.spans = _spans(events, warmup, iterations, table)
    return log


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
