"""A ProfileResult as an aligned table, JSON, CSV, a Chrome/Perfetto trace and a bar plot."""

import csv
import io
import json

from ticknorm.base.atomic import write_text
from ticknorm.profiler.profile import ProfileResult
from ticknorm.report.figures import pyplot, save_png


def table(result: ProfileResult) -> str:
    runtimes = list(result.logs)
    base = runtimes[0]
    head = f"{'module':<44}" + "".join(f"{r + ' ms':>14}" for r in runtimes)
    head += "".join(f"{r + '/' + base:>16}" for r in runtimes[1:])
    lines = [head]
    for module, timings in result.rows():
        cells = "".join(f"{timings[r].median_ms:>14.3f}" if r in timings else f"{'-':>14}" for r in runtimes)
        ratios = "".join(f"{timings[r].median_ms / timings[base].median_ms:>16.2f}"
                         if r in timings and base in timings and timings[base].median_ms > 0 else f"{'-':>16}"
                         for r in runtimes[1:])
        lines.append(f"{module[:44]:<44}{cells}{ratios}")
    lines.append("")
    for runtime, log in result.logs.items():
        lines.append(f"{runtime}: end-to-end {log.end_to_end_ms:.3f} ms (median, uninstrumented), "
                     f"coverage {log.coverage():.1%}, instrumentation overhead {log.overhead:+.1%}, "
                     f"{log.iterations} iterations, clock {log.clock}")
    return "\n".join(lines)


def to_dict(result: ProfileResult) -> dict:
    return {
        "depth": result.depth,
        "runtimes": {r: {"end_to_end_ms": log.end_to_end_ms, "coverage": log.coverage(), "overhead": log.overhead,
                         "iterations": log.iterations, "clock": log.clock} for r, log in result.logs.items()},
        "rows": [{"module": module, **{r: {"median_ms": t.median_ms, "p90_ms": t.p90_ms, "min_ms": t.min_ms}
                                       for r, t in timings.items()}} for module, timings in result.rows()],
    }


def write_json(result: ProfileResult, path) -> None:
    write_text(path, json.dumps(to_dict(result), indent=2))


def write_csv(result: ProfileResult, path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["module", "runtime", "median_ms", "p90_ms", "min_ms", "samples"])
    for module, timings in result.rows():
        for runtime, t in timings.items():
            writer.writerow([module, runtime, f"{t.median_ms:.6f}", f"{t.p90_ms:.6f}", f"{t.min_ms:.6f}", t.samples])
    write_text(path, buffer.getvalue())


def write_trace(result: ProfileResult, path) -> None:
    """Chrome trace format (chrome://tracing, ui.perfetto.dev): one process track per runtime,
    the first measured iteration of each, times relative to its first span."""
    events = []
    for pid, (runtime, log) in enumerate(result.logs.items(), start=1):
        events.append({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": f"{runtime} ({log.clock} clock)"}})
        spans = [s for s in log.spans if s.iteration == 0]
        origin = min((s.begin.ns for s in spans), default=0)
        for span in spans:
            events.append({"ph": "X", "pid": pid, "tid": 1, "name": span.layer, "ts": (span.begin.ns - origin) / 1000,
                           "dur": span.duration_ns / 1000, "args": {"modules": list(span.modules)}})
    write_text(path, json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def draw_bars(result: ProfileResult, top: int = 30):
    """Horizontal bars per module (the `top` slowest on any runtime), one colour per runtime."""
    import numpy as np

    plt = pyplot()
    slowest = sorted(result.rows(), key=lambda row: -max(t.median_ms for t in row[1].values()))[:top]
    rows = [row for row in result.rows() if row in slowest]  # back in model order
    runtimes = list(result.logs)
    height = 0.8 / len(runtimes)
    figure, axes = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    positions = np.arange(len(rows))
    for index, runtime in enumerate(runtimes):
        values = [timings[runtime].median_ms if runtime in timings else 0.0 for _, timings in rows]
        axes.barh(positions + index * height, values, height, label=runtime)
    axes.set_yticks(positions + height * (len(runtimes) - 1) / 2, [module[:50] for module, _ in rows], fontsize="small")
    axes.invert_yaxis()
    axes.set_xlabel("median latency per iteration (ms)")
    axes.legend()
    figure.tight_layout()
    return figure


def write_plot(result: ProfileResult, path) -> None:
    save_png(draw_bars(result), path)


WRITERS = {"json": write_json, "csv": write_csv, "trace": write_trace, "plot": write_plot}  # the files `profile` writes
