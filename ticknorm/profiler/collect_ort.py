"""ONNX Runtime: its built-in profiler (`enable_profiling`), node events parsed per run."""

import json
import os
import tempfile
import time

import onnx

from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.ticks import Span, Tick, TickLog, blocks
from ticknorm.runtime.ort_runner import OrtRunner

_RUN_EVENTS = ("model_run", "SequentialExecutor::Execute")


def collect_ort(runner: OrtRunner, feeds: dict, timing, table: ScopeTable, on_iteration=lambda: None) -> TickLog:
    """A plain session like `runner`'s and one with ONNX Runtime's profiler on, timed in alternating
    blocks (`ticks.blocks`), each block after one untimed run of its session. Both sessions' pool
    threads stop spinning when a run returns (they spin during a run as usual), so neither takes
    the cores of the other's block."""
    log = TickLog(runner.name, "runtime", iterations=timing.iterations)
    with tempfile.TemporaryDirectory() as workdir:
        def options(profiling: bool):
            def make():
                made = runner.session_options()
                made.add_session_config_entry("session.force_spinning_stop", "1")
                if profiling:
                    made.enable_profiling = True
                    made.profile_file_prefix = os.path.join(workdir, "ort")
                    made.optimized_model_filepath = os.path.join(workdir, "optimized.onnx")
                    # its weights beside it: only the graph is read back (what ORT renamed and fused)
                    made.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                  "optimized.onnx.data")
                    made.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                  "1024")
                return made
            return make

        with runner.variant(options(False)) as plain, runner.variant(options(True)) as profiling:
            plain.infer(feeds)  # checks the feeds against the model before anything is timed
            table.learn_rewritten(runner.model, onnx.load(os.path.join(workdir, "optimized.onnx"), load_external_data=False))
            timed_runs = _alternate(plain.session, profiling.session, feeds, timing, log, on_iteration)
            with open(profiling.session.end_profiling()) as handle:
                events = json.load(handle)
    log.spans = _spans(events, timed_runs, table)
    return log


def _alternate(plain, profiling, feeds: dict, timing, log: TickLog, on_iteration) -> list[int]:
    """Time both sessions into `log`; return which of the profiling session's runs were timed."""
    timed, count = [], 0
    for _ in range(timing.warmup):
        plain.run(None, feeds)
        profiling.run(None, feeds)
        count += 1
    for block in blocks(timing.iterations):
        for session, into in ((plain, log.end_to_end_ns), (profiling, log.instrumented_ns)):
            session.run(None, feeds)  # one untimed run after the other session's block
            count += session is profiling
            for _ in block:
                start = time.perf_counter_ns()
                session.run(None, feeds)
                into.append(time.perf_counter_ns() - start)
                if session is profiling:
                    timed.append(count)
                    count += 1
                on_iteration()
    return timed


def _spans(events: list, timed_runs: list[int], table: ScopeTable) -> list[Span]:
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") in _RUN_EVENTS),
                  key=lambda e: e["ts"])
    kind = next((name for name in _RUN_EVENTS if any(r["name"] == name for r in runs)), None)
    runs = [r for r in runs if r["name"] == kind]
    runs = [runs[index] for index in timed_runs if index < len(runs)]
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
