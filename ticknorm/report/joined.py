"""The view nobody else has: per PyTorch module, latency on each runtime and numeric error
against PyTorch on each runtime, on the same row. As JSON and as one self-contained HTML file.
A file reported alone has the file's own modules (or nodes) as rows and its reference's name
(`CompareReport.reference`) where PyTorch's would be."""

import html
import json
from dataclasses import asdict, dataclass, field

from ticknorm.base.atomic import write_text
from ticknorm.base.metrics import ArrayComparison
from ticknorm.profiler.profile import ProfileResult
from ticknorm.report.figures import png_base64
from ticknorm.report.profile_outputs import draw_bars, runtime_line, to_dict
from ticknorm.validate.compare import CompareReport


@dataclass
class JoinedRow:
    module: str
    # Keyed by runtime; torch has no max_abs, cosine or passed (it is the reference).
    latency_ms: dict[str, float] = field(default_factory=dict)  # median
    share: dict[str, float] = field(default_factory=dict)  # fraction of that runtime's attributed time
    max_abs: dict[str, float] = field(default_factory=dict)  # max |runtime - torch|
    cosine: dict[str, float] = field(default_factory=dict)
    passed: dict[str, bool] = field(default_factory=dict)
    flagged: bool = False  # slow (above the median share) and over tolerance on some runtime


def join(profile: ProfileResult, accuracy: CompareReport) -> list[JoinedRow]:
    errors: dict[str, dict[str, ArrayComparison]] = {}
    for layer in accuracy.layers:
        if layer.comparison is not None:
            errors.setdefault(layer.module, {})[layer.runtime] = layer.comparison
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


SCHEMA = 1  # of the JSON `report --json` writes; raised when a field changes meaning


@dataclass
class JoinedReport:
    """The rows, and what a reader needs to sign them off: the verdict, the tolerances each runtime
    was judged at, the model's digest, the inputs, the timing settings, the versions, the date."""

    rows: list[JoinedRow]
    profile: ProfileResult
    accuracy: CompareReport
    meta: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.accuracy.passed

    def to_dict(self) -> dict:
        outputs = {runtime: [asdict(check) for check in checks] for runtime, checks in self.accuracy.outputs.items()}
        return {"schema": SCHEMA, "passed": self.passed, "meta": self.meta, "outputs": outputs,
                "profile": to_dict(self.profile), "rows": [asdict(row) for row in self.rows]}


def write_json(report: JoinedReport, path) -> None:
    write_text(path, json.dumps(report.to_dict(), indent=2, default=float))


def _cosine(value: float) -> str:
    """Six decimals, or how far from 1 where six decimals would print 1.000000 for a value that
    rounding alone does not explain (a failing row's cosine is never shown as a clean 1)."""
    return f"1-{1 - value:.1e}" if 1e-12 < 1 - value < 5e-7 else f"{value:.6f}"


def _latency(timing) -> str:
    mark = " <b title='p10-p90 spread wider than half the median'>!</b>" if timing.unstable else ""
    return f"{timing.median_ms:.3f}<small> ({timing.p10_ms:.3f}&ndash;{timing.p90_ms:.3f})</small>{mark}"


def _rows_are(accuracy: CompareReport) -> str:
    """What the rows of the page are: PyTorch's modules, or the modules (nodes) a file alone names."""
    if accuracy.reference.startswith("torch"):
        return "PyTorch modules"
    return "the file's modules" if accuracy.unit == "module" else "the file's nodes (it names no module)"


def write_html(report: JoinedReport, path, title: str) -> None:
    profile, accuracy = report.profile, report.accuracy
    runtimes = list(profile.logs)
    compared = list(accuracy.outputs)
    head = "".join(f"<th>{html.escape(r)} ms (p10&ndash;p90)</th>" for r in runtimes)
    head += "".join(f"<th>{html.escape(r)} max abs</th><th>{html.escape(r)} cosine</th>" for r in compared)
    timings = dict(profile.rows())
    body = []
    for row in report.rows:
        timed = timings.get(row.module, {})
        cells = "".join(f"<td>{_latency(timed[r])}</td>" if r in timed else "<td>-</td>" for r in runtimes)
        for r in compared:
            if r in row.max_abs:
                cls = "" if row.passed[r] else " class='bad'"
                cells += f"<td{cls}>{row.max_abs[r]:.3g}</td><td>{_cosine(row.cosine[r])}</td>"
            else:
                cells += "<td>-</td><td>-</td>"
        css = " class='flag'" if row.flagged else ""
        body.append(f"<tr{css}><td>{html.escape(row.module)}</td>{cells}</tr>")
    summary = "".join(f"<li>{html.escape(runtime_line(r, log))}</li>" for r, log in profile.logs.items())
    against = html.escape(accuracy.reference)
    summary += "".join(f"<li class='{'ok' if c.passed else 'bad'}'>{html.escape(r)} vs {against}, "
                       f"{html.escape(c.name)}: "
                       f"max abs {c.max_abs:.3g}, cosine {_cosine(c.cosine)}, at atol {accuracy.tolerances[r][0]:g} "
                       f"rtol {accuracy.tolerances[r][1]:g}: {'ok' if c.passed else 'FAIL'}</li>"
                       for r, checks in accuracy.outputs.items() for c in checks)
    meta = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(v if isinstance(v, str) else json.dumps(v))}</dd>"
                   for k, v in report.meta.items())
    verdict = "PASS" if report.passed else "FAIL"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}}
td:first-child,th:first-child{{text-align:left}} td:first-child{{font-family:monospace}} tr.flag{{background:#fde2e2}}
td.bad,li.bad{{color:#b00;font-weight:bold}}
.verdict{{font-size:1.4em;font-weight:bold;color:{'#070' if report.passed else '#b00'}}}
dl{{display:grid;grid-template-columns:max-content auto;gap:2px 12px;font-size:0.9em}} dt{{font-weight:bold}}
dd{{margin:0;font-family:monospace}} small{{color:#666}}</style></head><body><h1>{html.escape(title)}</h1>
<p class="verdict">{verdict}</p><dl>{meta}</dl><ul>{summary}</ul>
<p>Rows are {_rows_are(accuracy)} in model order, with each runtime's median latency and its p10&ndash;p90 spread
(<b>!</b>: wider than half the median, no figure to take a ratio of). Highlighted: slow (at or above the median
share of time) and over tolerance against {against} on some runtime (max abs in red).</p>
<img alt="latency per {accuracy.unit}" src="data:image/png;base64,{png_base64(draw_bars(profile))}">
<table><tr><th>{accuracy.unit}</th>{head}</tr>{''.join(body)}</table></body></html>"""
    write_text(path, page)
