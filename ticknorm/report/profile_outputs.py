"""A ProfileResult as an aligned table, JSON, CSV, a Chrome/Perfetto trace and a bar plot."""

import csv
import io
import json

from ticknorm.base.atomic import write_text
from ticknorm.base.text_table import render
from ticknorm.profiler.profile import ProfileResult
from ticknorm.profiler.ticks import SPREAD_LIMIT
from ticknorm.report.figures import pyplot, save_png


def table(result: ProfileResult) -> str:
    """Median ms per module and runtime with its spread, ratios to the first runtime (marked where a
    spread makes them meaningless), then one line per runtime."""
    runtimes = list(result.logs)
    base = runtimes[0]
    columns = [result.unit] + [f"{r} ms (p10-p90)" for r in runtimes] + [f"{r}/{base}" for r in runtimes[1:]]
    rows, unstable = [], 0
    for module, timings in result.rows():
        cells = [module]
        for runtime in runtimes:
            t = timings.get(runtime)
            cells.append(f"{t.median_ms:.3f} ({t.p10_ms:.3f}-{t.p90_ms:.3f}){' !' if t.unstable else ''}" if t else "-")
        unstable += any(t.unstable for t in timings.values())
        cells += [ratio(timings, runtime, base) for runtime in runtimes[1:]]
        rows.append(cells)
    lines = [render(columns, rows), ""]
    if unstable:
        lines.append(f"! {unstable} row(s) spread wider than {SPREAD_LIMIT:.0%} of their median between p10 and p90: "
                     "their ratios are marked '?'; rerun with more --iterations on a quieter machine")
    lines += [runtime_line(runtime, log) for runtime, log in result.logs.items()]
    return "\n".join(lines)


def ratio(timings: dict, runtime: str, base: str) -> str:
    if runtime not in timings or base not in timings or timings[base].median_ms <= 0:
        return "-"
    value = timings[runtime].median_ms / timings[base].median_ms
    return f"{value:.2f}" + ("?" if timings[runtime].unstable or timings[base].unstable else "")


def runtime_line(runtime: str, log) -> str:
    warning = ""
    if log.overhead < -0.05:
        warning = " (negative: the plain and the instrumented runs disagree beyond noise; rerun with more iterations)"
    device = f", GPU compute {log.device_ms:.3f} ms without copies" if log.device_ns else ""
    how = log.source or f"{log.iterations} iterations, clock {log.clock}"
    return (f"{runtime}: end-to-end {log.end_to_end_ms:.3f} ms (median, uninstrumented{device}), coverage "
            f"{log.coverage():.1%}, instrumentation overhead {log.overhead:+.1%}{warning}, {how}")


def to_dict(result: ProfileResult) -> dict:
    return {
        "depth": result.depth,
        "unit": result.unit,  # each row's "module" is a node where the file names no module
        "runtimes": {r: {"end_to_end_ms": log.end_to_end_ms, "gpu_compute_ms": log.device_ms if log.device_ns else None,
                         "coverage": log.coverage(), "overhead": log.overhead, "iterations": log.iterations,
                         "clock": log.clock, "source": log.source or None} for r, log in result.logs.items()},
        "rows": [{"module": module, **{r: {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
                                           "min_ms": t.min_ms, "spread": t.spread, "unstable": t.unstable}
                                       for r, t in timings.items()}} for module, timings in result.rows()],
    }


def write_json(result: ProfileResult, path) -> None:
    write_text(path, json.dumps(to_dict(result), indent=2))


def write_csv(result: ProfileResult, path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["module", "runtime", "median_ms", "p10_ms", "p90_ms", "min_ms", "samples", "unstable"])
    for module, timings in result.rows():
        for runtime, t in timings.items():
            times = (f"{ms:.6f}" for ms in (t.median_ms, t.p10_ms, t.p90_ms, t.min_ms))
            writer.writerow([module, runtime, *times, t.samples, int(t.unstable)])
    write_text(path, buffer.getvalue())


def write_trace(result: ProfileResult, path) -> None:
    """Chrome trace format (chrome://tracing, ui.perfetto.dev): one process track per runtime,
    the first measured iteration of each, times relative to its first span."""
    events = []
    for pid, (runtime, log) in enumerate(result.logs.items(), start=1):
        events.append({"ph": "M", "pid": pid, "name": "process_name",
                       "args": {"name": f"{runtime} ({log.clock} clock)"}})
        spans = [s for s in log.spans if s.iteration == 0]
        origin = min((s.begin.ns for s in spans), default=0)
        for span in spans:
            events.append({"ph": "X", "pid": pid, "tid": 1, "name": span.layer, "ts": (span.begin.ns - origin) / 1000,
                           "dur": span.duration_ns / 1000, "args": {"modules": list(span.modules)}})
    write_text(path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def draw_bars(result: ProfileResult, top: int = 30):
    """Horizontal bars per module (the `top` slowest on any runtime), one colour per runtime; the
    title says what was left out."""
    import numpy as np

    plt = pyplot()
    everything = result.rows()
    slowest = sorted(everything, key=lambda row: -max(t.median_ms for t in row[1].values()))[:top]
    rows = [row for row in everything if row in slowest]  # back in model order
    runtimes = list(result.logs)
    height = 0.8 / len(runtimes)
    figure, axes = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    positions = np.arange(len(rows))
    for index, runtime in enumerate(runtimes):
        values = [timings[runtime].median_ms if runtime in timings else 0.0 for _, timings in rows]
        axes.barh(positions + index * height, values, height, label=runtime)
    axes.set_yticks(positions + height * (len(runtimes) - 1) / 2, [module for module, _ in rows], fontsize="small")
    axes.invert_yaxis()
    axes.set_xlabel("median latency per iteration (ms)")
    left_out = len(everything) - len(rows)
    if left_out:
        total = sum(max(t.median_ms for t in timings.values()) for _, timings in everything)
        hidden = total - sum(max(t.median_ms for t in timings.values()) for _, timings in rows)
        axes.set_title(f"the {len(rows)} slowest of {len(everything)} {result.unit}s; {left_out} not drawn "
                       f"({hidden / total:.1%} of the time)" if total else "", fontsize="small")
    axes.legend()
    figure.tight_layout()
    return figure


def write_plot(result: ProfileResult, path) -> None:
    save_png(draw_bars(result), path)


WRITERS = {"json": write_json, "csv": write_csv, "trace": write_trace, "plot": write_plot}  # the files `profile` writes
