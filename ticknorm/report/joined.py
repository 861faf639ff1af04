"""The view nobody else has: per PyTorch module, latency on each runtime and numeric error
against PyTorch on each runtime, on the same row. As JSON and as one self-contained HTML file."""

import html
import json
from dataclasses import asdict, dataclass, field

from ticknorm.base.atomic import write_text
from ticknorm.profiler.profile import ProfileResult
from ticknorm.report.figures import png_base64
from ticknorm.report.profile_outputs import draw_bars
from ticknorm.validate.compare import CompareReport


@dataclass
class JoinedRow:
    module: str
    latency_ms: dict = field(default_factory=dict)  # runtime -> median ms
    share: dict = field(default_factory=dict)  # runtime -> fraction of that runtime's attributed time
    max_abs: dict = field(default_factory=dict)  # runtime -> max |runtime - torch| (torch: absent)
    cosine: dict = field(default_factory=dict)
    passed: dict = field(default_factory=dict)
    flagged: bool = False  # slow (above the median share) and over tolerance on some runtime


def join(profile: ProfileResult, accuracy: CompareReport) -> list[JoinedRow]:
    errors = {}
    for row in accuracy.layers:
        if row.comparison is not None:
            errors.setdefault(row.module, {})[row.runtime] = row.comparison
    rows = []
    totals = {r: sum(t.median_ms for _, timings in profile.rows() for rr, t in timings.items() if rr == r)
              for r in profile.logs}
    for module, timings in profile.rows():
        row = JoinedRow(module)
        for runtime, t in timings.items():
            row.latency_ms[runtime] = t.median_ms
            row.share[runtime] = t.median_ms / totals[runtime] if totals[runtime] else 0.0
        for runtime, comparison in errors.get(module, {}).items():
            row.max_abs[runtime], row.cosine[runtime], row.passed[runtime] = (comparison.max_abs, comparison.cosine,
                                                                             comparison.passed)
        rows.append(row)
    shares = sorted(max(r.share.values(), default=0.0) for r in rows)
    median_share = shares[len(shares) // 2] if shares else 0.0
    for row in rows:
        row.flagged = max(row.share.values(), default=0.0) >= median_share and not all(row.passed.values() or [True])
    return rows


def write_rows_json(rows: list[JoinedRow], path) -> None:
    write_text(path, json.dumps([asdict(r) for r in rows], indent=2, default=float))


def write_html(rows: list[JoinedRow], profile: ProfileResult, accuracy: CompareReport, path, title: str) -> None:
    runtimes = list(profile.logs)
    compared = list(accuracy.outputs)
    head = "".join(f"<th>{html.escape(r)} ms</th>" for r in runtimes)
    head += "".join(f"<th>{html.escape(r)} max abs</th><th>{html.escape(r)} cosine</th>" for r in compared)
    body = []
    for row in rows:
        cells = "".join(f"<td>{row.latency_ms[r]:.3f}</td>" if r in row.latency_ms else "<td>-</td>" for r in runtimes)
        for r in compared:
            if r in row.max_abs:
                cls = "" if row.passed[r] else " class='bad'"
                cells += f"<td{cls}>{row.max_abs[r]:.3g}</td><td{cls}>{row.cosine[r]:.6f}</td>"
            else:
                cells += "<td>-</td><td>-</td>"
        css = " class='flag'" if row.flagged else ""
        body.append(f"<tr{css}><td>{html.escape(row.module)}</td>{cells}</tr>")
    summary = "".join(f"<li>{html.escape(r)}: end-to-end {log.end_to_end_ms:.3f} ms, coverage {log.coverage():.1%}, "
                      f"overhead {log.overhead:+.1%}</li>" for r, log in profile.logs.items())
    summary += "".join(f"<li>{html.escape(c.name)} on {html.escape(r)}: max abs {c.max_abs:.3g}, cosine {c.cosine:.6f}, "
                       f"{'ok' if c.passed else 'FAIL'}</li>" for r, checks in accuracy.outputs.items() for c in checks)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px;
text-align:right}} td:first-child{{text-align:left;font-family:monospace}} tr.flag{{background:#fde2e2}}
td.bad{{color:#b00;font-weight:bold}}</style></head><body><h1>{html.escape(title)}</h1>
<p>Rows are PyTorch modules in model order. Highlighted: slow (at or above the median share of time) and
over tolerance against PyTorch on some runtime.</p><ul>{summary}</ul>
<img alt="latency per module" src="data:image/png;base64,{png_base64(draw_bars(profile))}">
<table><tr><th>module</th>{head}</tr>{''.join(body)}</table></body></html>"""
    write_text(path, page)

