"""`ticknorm runtimes --check`: does the stack on this host compute the right thing, and how fast
is its LayerNorm path? `ticknorm runtimes` only says what is installed; a deployer landing on a new
target GPU needs each runtime proven on a real model before exporting anything.

A small LayerNorm model (`probe_model`) is exported once with the project's own export (so its
LayerNorms are fused and verified as a user's would be) and run on every runtime this host has,
each judged against PyTorch fp32 on the CPU at the tolerance of the type it computes in, and timed;
TensorRT also runs the `--ln-target plugin` graph. On a CUDA host `kernel_check` adds ticknorm's own
kernel and its PTX. Every check ends in its own row (`check_rows`)."""

import functools
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from ticknorm.base.errors import RuntimeUnavailable
from ticknorm.base.inputs import graph_feeds
from ticknorm.base.metrics import Tolerance, compare_arrays
from ticknorm.base.onnx_io import load_onnx
from ticknorm.base.precision import TYPE_NAMES
from ticknorm.base.text_table import render
from ticknorm.exporter.export import export_model
from ticknorm.exporter.plugin_target import to_plugin_target
from ticknorm.exporter.precision.targets import runner_setup
from ticknorm.plugins.aot import driver_version
from ticknorm.runtime.registry import Runtimes, make_runner, runtime_precision, runtime_statuses
from ticknorm.runtime.torch_runner import TorchRunner
from ticknorm.validate.check_rows import (ERROR, FAIL, PASS, REFERENCE, UNAVAILABLE, CheckRow, caught, failed_row,
                                          median_ms)
from ticknorm.validate.kernel_check import kernel_rows

ITERATIONS = 20


@dataclass(frozen=True)
class Target:
    runtime: str  # a `make_runner` name
    family: str  # its `runtime_statuses()` entry, which says whether it can run here and why not
    plugin: bool = False  # the `--ln-target plugin` graph (TensorRT only)

    @property
    def label(self) -> str:
        return f"{self.runtime} plugin" if self.plugin else self.runtime


TARGETS = (Target("torch-cuda", "torch-cuda"), Target("torch-cuda-fp16", "torch-cuda"),
           Target("torch-cuda-bf16", "torch-cuda"), Target("ort-cpu", "ort-cpu"), Target("ort-cuda", "ort-cuda"),
           Target("trt", "trt"), Target("trt-fp16", "trt"), Target("trt-bf16", "trt"),
           Target("trt", "trt", plugin=True), Target("trt-fp16", "trt", plugin=True))


@dataclass(frozen=True)
class Probe:
    """The exported probe model and what every runtime is judged against."""

    module: object
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]  # PyTorch's fp32 CPU outputs, by graph output name


@dataclass
class HostReport:
    host: dict
    rows: list[CheckRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """1 when a check computed wrong numbers; 2 when a present runtime broke or nothing could
        be checked; 0 when every check that could run here passed."""
        if any(row.verdict == FAIL for row in self.rows):
            return 1
        if any(row.verdict == ERROR for row in self.rows) or not any(row.verdict == PASS for row in self.rows):
            return 2
        return 0

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    def verdict(self) -> str:
        verdicts = [row.verdict for row in self.rows]
        counts = {verdict: verdicts.count(verdict) for verdict in (PASS, FAIL, ERROR, UNAVAILABLE)}
        tally = (f"{counts[PASS]} passed, {counts[FAIL]} wrong, {counts[ERROR]} broke, {counts[UNAVAILABLE]} "
                 f"unavailable here ({self.seconds:.1f} s)")
        if self.exit_code == 1:
            return f"FAIL: wrong numbers from {', '.join(r.check for r in self.rows if r.verdict == FAIL)}; {tally}"
        if any(row.verdict == ERROR for row in self.rows):
            return f"ERROR: {', '.join(r.check for r in self.rows if r.verdict == ERROR)} could not run; {tally}"
        return f"PASS: {tally}" if self.passed else f"ERROR: nothing could be checked here; {tally}"

    def text(self) -> str:
        host = self.host
        lines = [f"host: {host['platform']}, Python {host['python']}, {host['cpus']} CPUs, "
                 f"GPU: {host['gpu'] or 'none'}, CUDA driver: {host['cuda_driver'] or 'none'}"]
        cells = [[row.check, row.version, row.device, row.verdict, _number(row.max_error, ".2g"),
                  "-" if row.tolerance is None else f"{row.tolerance[0]:g}/{row.tolerance[1]:g}",
                  _number(row.median_ms, ".3f"), row.note] for row in self.rows]
        columns = ["check", "version", "device", "verdict", "max error", "atol/rtol", "median ms", "note"]
        lines.append(render(columns, cells, left_columns=len(columns)))
        lines.append(self.verdict())
        return "\n".join(lines)

    def to_json(self) -> str:
        """Strict JSON: a max error that is not finite (a shape or NaN mismatch) is null, its note says why."""
        rows = [{**asdict(row), "max_error": row.max_error if _finite(row.max_error) else None} for row in self.rows]
        return json.dumps({"host": self.host, "rows": rows, "verdict": self.verdict(), "exit_code": self.exit_code,
                           "seconds": self.seconds}, indent=2, allow_nan=False)


def check_host(progress=lambda message: None, iterations: int = ITERATIONS) -> HostReport:
    """Every runtime, then (on a CUDA host) the kernel and its PTX, each in its own row."""
    started = time.perf_counter()
    statuses = {status.name: status for status in runtime_statuses()}
    gpu = _gpu_name(statuses)
    torch_row = CheckRow("torch", statuses["torch"].version, "cpu", REFERENCE)
    try:
        torch_row, probe = _reference(torch_row, statuses["torch"], iterations, progress)
    except Exception as exc:  # noqa: BLE001 - without a reference every runtime row says so, below
        probe, torch_row = None, failed_row(torch_row, exc)
    rows = [torch_row]
    for target in TARGETS:
        status = statuses[target.family]
        row = CheckRow(target.label, status.version, "cpu" if target.family == "ort-cpu" else gpu or "-")
        progress(f"checking {target.label}")
        rows.append(caught(row, functools.partial(_run_target, row, target, probe, status, iterations)))
    rows += kernel_rows(iterations, gpu, progress)
    host = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(), "gpu": gpu,
            "cuda_driver": driver_version()}
    return HostReport(host, rows, time.perf_counter() - started)


def _reference(row: CheckRow, status, iterations: int, progress) -> tuple[CheckRow, Probe]:
    """The probe model exported, fused and verified once (into a folder that is gone after), and
    PyTorch's outputs on it, timed like every other row."""
    if not status.available:
        raise RuntimeUnavailable(status.reason)
    from ticknorm.validate.probe_model import build_probe, probe_feeds

    progress("exporting the LayerNorm probe model")
    module, feeds = build_probe(), probe_feeds()
    with tempfile.TemporaryDirectory(prefix="ticknorm-check-") as workdir:
        path = Path(workdir) / "probe.onnx"
        export_model(module, feeds, path, progress=progress)
        model = load_onnx(path)
    with TorchRunner(module, [o.name for o in model.graph.output]) as runner:
        reference = runner.infer(feeds).outputs
        elapsed = median_ms(lambda: runner.infer(feeds), iterations)
    note = "PyTorch fp32 on the CPU: every other row is judged against it"
    return replace(row, median_ms=elapsed, note=note), Probe(module, model, feeds, reference)


def _run_target(row: CheckRow, target: Target, probe: Probe | None, status, iterations: int) -> CheckRow:
    if not status.available:
        raise RuntimeUnavailable(status.reason)
    if probe is None:
        raise RuntimeUnavailable("no PyTorch reference to judge against (see the torch row)")
    model, setup = _graph_and_setup(target, probe)
    runner = make_runner(target.runtime, model, setup)
    feeds = probe.feeds if isinstance(runner, TorchRunner) else graph_feeds(model, probe.feeds)
    with runner:
        outputs = runner.infer(feeds).outputs
        elapsed = median_ms(lambda: runner.infer(feeds), iterations)
    judged = Tolerance().at(TYPE_NAMES[runtime_precision(target.runtime, model)])
    checks = [compare_arrays(name, expected, outputs[name], *judged.of(name))
              for name, expected in probe.reference.items()]
    failed = next((check for check in checks if not check.passed), None)
    return replace(row, verdict=FAIL if failed else PASS, max_error=max(check.max_abs for check in checks),
                   tolerance=(judged.atol, judged.rtol), median_ms=elapsed,
                   note=f"{failed.name}: {failed.reason}" if failed else "")


def _graph_and_setup(target: Target, probe: Probe):
    """The graph a target runs and its runner setup (a low-precision target's measured policy, and
    for TensorRT the graph converted to it); the plugin targets take both graphs with their
    LayerNorms on the TensorRT plugin."""
    setup = runner_setup(probe.model, probe.module, probe.feeds, Runtimes((target.runtime,)))
    if not target.plugin:
        return probe.model, setup
    low = {dtype: replace(entry, graph=to_plugin_target(entry.graph).model) if entry.graph is not None else entry
           for dtype, entry in setup.low.items()}
    return to_plugin_target(probe.model).model, replace(setup, low=low)


def _gpu_name(statuses: dict) -> str | None:
    if not statuses["torch-cuda"].available:
        return None
    import torch

    return torch.cuda.get_device_name()


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
