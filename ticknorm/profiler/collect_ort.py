"""ONNX Runtime: its built-in profiler (`enable_profiling`), node events parsed per run."""

import json
import os
import tempfile
import time

import onnx

from ticknorm.base.inputs import graph_feeds
from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.ticks import Span, Tick, TickLog, blocks
from ticknorm.runtime.ort_runner import OrtRunner, failed_run

_RUN_EVENTS = ("model_run", "SequentialExecutor::Execute")
SETTLE_NS = 10_000_000  # longer than ONNX Runtime's pool threads spin after a run


def collect_ort(runner: OrtRunner, feeds: dict, timing, table: ScopeTable, on_iteration=lambda: None) -> TickLog:
    """The feeds the graph takes (`graph_feeds`), run by a session with ONNX Runtime's profiler on
    and a plain one like `runner`'s, timed in alternating blocks (`ticks.blocks`). Both are
    configured alike but for the profiler: their pool threads spin a while after each run, as a
    deployment's do (stopping them costs a 0.1 ms model 10-15 % of its end to end). So that the idle
    session's spinning takes no core from the timed block, each block starts with untimed runs of
    its session for at least SETTLE_NS (one run of BERT-base, dozens of a tiny model), by which time
    the other session's threads sleep. With one block of each kind there is nothing to alternate:
    one session times its profiled block, then, its profiler ended, its plain block."""
    log = TickLog(runner.name, "runtime", iterations=timing.iterations)
    feeds = graph_feeds(runner.model, feeds)
    alternating = len(blocks(timing.iterations)) > 1
    with tempfile.TemporaryDirectory() as workdir:
        written = os.path.join(workdir, "optimized.onnx")

        def options(profiling: bool):
            def make():  # the variant adds the runner's own settings (optimization, weights) to these
                import onnxruntime

                made = onnxruntime.SessionOptions()
                if profiling:
                    made.enable_profiling = True
                    made.profile_file_prefix = os.path.join(workdir, "ort")
                    made.optimized_model_filepath = written
                    # its weights apart, into nothing: only the graph is read back (what ORT renamed and fused)
                    made.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                  _discarded(written + ".data"))
                    made.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                  "1024")
                return made
            return make

        with runner.variant(options(True)) as profiling:
            profiling.check(feeds)
            table.learn_rewritten(runner.model, onnx.load(written, load_external_data=False))
            runs = _Runs(profiling.session, feeds, log, on_iteration, runner.name)
            if alternating:
                with runner.variant(options(False)) as plain:
                    runs.alternate(plain.session, timing)
            else:
                runs.profiled_then_plain(timing)
            events = runs.events or _ended(profiling.session)
    log.spans = _spans(events, runs.timed, table)
    return log


def _discarded(path: str) -> str:
    """The name of a file beside the optimized graph that discards what is written to it (the
    weights, which ORT writes out again in full: over a second for BERT-base on this disk), or of a
    real file where the system cannot link one to the null device."""
    try:
        os.symlink(os.devnull, path)
    except OSError:
        pass
    return os.path.basename(path)


def _ended(session) -> list[dict]:
    with open(session.end_profiling()) as handle:
        return json.load(handle)


class _Runs:
    """The profiling session's runs, counted from its first (0), and which of them were timed. A
    failing run is one line, whichever run it is (no run is made only to check the model)."""

    def __init__(self, profiling, feeds: dict, log: TickLog, on_iteration, name: str):
        self.profiling, self.feeds, self.log, self.on_iteration = profiling, feeds, log, on_iteration
        self.name, self.count = name, 0
        self.timed: list[int] = []  # which of its runs were timed, by count
        self.events: list[dict] | None = None  # its profiler's events, once ended mid-way (`profiled_then_plain`)

    def alternate(self, plain, timing) -> None:
        for _ in range(timing.warmup):
            self._run(plain)
            self._profiled()
        for block in blocks(timing.iterations):
            self._block(plain, block, self.log.end_to_end_ns, timing.settles)
            self._block(self.profiling, block, self.log.instrumented_ns, timing.settles)

    def profiled_then_plain(self, timing) -> None:
        for _ in range(timing.warmup):
            self._profiled()
        block = blocks(timing.iterations)[0]
        self._block(self.profiling, block, self.log.instrumented_ns, untimed=False)  # nothing else ran before it
        self.events = _ended(self.profiling)  # the profiler off: the session runs as a plain one
        self._block(self.profiling, block, self.log.end_to_end_ns, timing.settles)

    def _profiled(self) -> None:
        self._run(self.profiling)
        self.count += 1

    def _run(self, session) -> None:
        try:
            session.run(None, self.feeds)
        except Exception as exc:  # noqa: BLE001 - ORT raises untyped errors
            raise failed_run(self.name, exc) from exc

    def _block(self, session, block, into: list, untimed: bool) -> None:
        profiled = session is self.profiling and self.events is None
        if untimed:  # untimed runs after the other kind's block, until that session's pool stopped spinning
            start = time.perf_counter_ns()
            while True:
                self._run(session)
                self.count += profiled
                if time.perf_counter_ns() - start >= SETTLE_NS:
                    break
        for _ in block:
            start = time.perf_counter_ns()
            self._run(session)
            into.append(time.perf_counter_ns() - start)
            if profiled:
                self.timed.append(self.count)
                self.count += 1
            self.on_iteration()


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
        inside = [event for event in nodes if run["ts"] <= event["ts"] <= end]
        for event in inside:
            name = event["name"].removesuffix("_kernel_time")
            begin = event["ts"] * 1000
            spans.append(Span(name, table.modules_for_ort(name), iteration, Tick("runtime", begin),
                              Tick("runtime", begin + _own_us(event, name, inside, table) * 1000)))
    return spans


def _own_us(event: dict, name: str, events: list, table: ScopeTable) -> int:
    """A node's time without the nodes it ran inside it: an If, Loop or Scan is timed around its
    body, whose nodes are timed one by one too."""
    if name not in table.holders:
        return event["dur"]
    nested = [e for e in events if e is not event and _within(e, event)]
    direct = [e for e in nested if not any(o is not e and _within(e, o) for o in nested)]
    return max(0, event["dur"] - sum(e["dur"] for e in direct))


def _within(inner: dict, outer: dict) -> bool:
    return outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
