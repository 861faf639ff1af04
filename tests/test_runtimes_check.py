"""`ticknorm runtimes --check` on this CPU host, against real ONNX Runtime and PyTorch: the rows,
the exit codes, a planted wrong runtime named, and a check that breaks or finds a piece missing
ending in its own one-line row while the rest still run."""

import json
import sys
import time
import types

import numpy as np
import pytest
from click.testing import CliRunner

from ticknorm import api
from ticknorm.cli import main
from ticknorm.runtime.base import RunOutputs
from ticknorm.runtime import trt_runner
from ticknorm.runtime.registry import RuntimeStatus, runtime_statuses
from ticknorm.validate import host_check, kernel_check

torch = pytest.importorskip("torch")
ON_GPU = torch.cuda.is_available()
KERNEL_ROWS = ["triton layer_norm fp32", "triton layer_norm fp16", "triton layer_norm bf16",
               "plugin ptx fp16 1000x768", "plugin ptx bf16 37x2041", "plugin ptx fp32 5x8192"]
ROWS = ["torch", "torch-cuda", "torch-cuda-fp16", "torch-cuda-bf16", "ort-cpu", "ort-cuda", "trt", "trt-fp16", "trt-bf16",
        "trt plugin", "trt-fp16 plugin", *KERNEL_ROWS]


@pytest.fixture(scope="module")
def report():
    started = time.perf_counter()
    checked = api.check_runtimes()
    return checked, time.perf_counter() - started


def _rows(checked) -> dict:
    return {row.check: row for row in checked.rows}


def test_every_runtime_has_a_row_and_this_host_passes(report):
    checked, seconds = report
    assert [row.check for row in checked.rows] == ROWS
    rows = _rows(checked)
    assert rows["torch"].verdict == "reference" and rows["torch"].median_ms > 0
    ort = rows["ort-cpu"]
    assert (ort.verdict, ort.device, ort.tolerance) == ("pass", "cpu", (1e-4, 1e-3))  # fp32's bar
    assert 0 <= ort.max_error < 1e-4 and ort.median_ms > 0
    for row in checked.rows:
        assert row.verdict in ("reference", "pass", "unavailable"), (row.check, row.note)
        if row.verdict == "unavailable":
            assert row.note and "\n" not in row.note  # the reason, in one line
    if not ON_GPU:
        assert rows["torch-cuda"].note == "no CUDA device visible to torch"
        assert all(rows[name].note.startswith("no CUDA device visible to torch") for name in KERNEL_ROWS)
    assert checked.exit_code == 0 and checked.passed
    assert seconds < 60  # the bound on a CPU host
    text = checked.text()
    assert text.startswith("host: ") and text.splitlines()[-1].startswith("PASS: ")
    assert all(f"\n{name} " in text for name in ROWS)


def test_cli_json_is_strict_json_with_one_entry_per_runtime():
    result = CliRunner().invoke(main, ["runtimes", "--check", "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert [row["check"] for row in written["rows"]] == ROWS
    assert written["exit_code"] == 0 and written["verdict"].startswith("PASS")
    assert set(written["rows"][0]) == {"check", "version", "device", "verdict", "max_error", "tolerance", "median_ms", "note"}
    assert {"platform", "python", "cpus", "gpu", "cuda_driver"} <= set(written["host"])


def test_plain_runtimes_json_lists_the_statuses():
    result = CliRunner().invoke(main, ["runtimes", "--json"])
    assert result.exit_code == 0, result.output
    assert [entry["name"] for entry in json.loads(result.stdout)] == [s.name for s in runtime_statuses()]


def _planted(real, runtime: str, plant):
    """make_runner, with `plant` replacing one runtime's infer: only the check's runners are touched
    (the export inside the check runs its own ONNX Runtime sessions, which must stay right)."""
    def make_runner(name, model, setup, taps=()):
        runner = real(name, model, setup, taps)
        if name == runtime:
            runner.infer = plant(runner.infer)
        return runner
    return make_runner


def test_a_runtime_computing_wrong_numbers_exits_1_and_is_named(monkeypatch):
    def off_by_one(infer):
        def wrong(feeds):
            result = infer(feeds)
            return RunOutputs({name: value + 1.0 for name, value in result.outputs.items()}, result.taps)
        return wrong

    monkeypatch.setattr(host_check, "make_runner", _planted(host_check.make_runner, "ort-cpu", off_by_one))
    result = CliRunner().invoke(main, ["runtimes", "--check"])
    assert result.exit_code == 1, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("ort-cpu "))
    assert " FAIL " in row and "max |error| 1 > atol 0.0001" in row
    assert result.stdout.splitlines()[-1].startswith("FAIL: wrong numbers from ort-cpu;")


def test_a_check_that_breaks_is_its_row_and_the_rest_still_run(monkeypatch):
    def exploding(infer):
        def run(feeds):
            raise RuntimeError("planted: the session fell over\nand said more on a second line")
        return run

    def kernel_breaks(*args):
        raise ValueError("planted kernel failure")

    monkeypatch.setattr(host_check, "make_runner", _planted(host_check.make_runner, "ort-cpu", exploding))
    monkeypatch.setattr(kernel_check, "_kernel_row", kernel_breaks)
    checked = api.check_runtimes()
    rows = _rows(checked)
    assert [row.check for row in checked.rows] == ROWS  # every check after the broken ones still ran
    assert (rows["ort-cpu"].verdict, rows["ort-cpu"].note) == ("error", "RuntimeError: planted: the session fell over")
    for dtype in ("fp32", "fp16", "bf16"):
        assert (rows[f"triton layer_norm {dtype}"].verdict, rows[f"triton layer_norm {dtype}"].note) == (
            "error", "ValueError: planted kernel failure")
    assert rows["torch"].verdict == "reference" and rows["plugin ptx fp16 1000x768"].verdict in ("unavailable", "pass")
    assert checked.exit_code == 2 and checked.verdict().startswith("ERROR: ort-cpu, triton layer_norm fp32")


@pytest.mark.skipif(ON_GPU, reason="the CPU host's answer: a GPU host has a CUDA backend")
def test_triton_without_a_gpu_backend_is_one_line_per_kernel_row(monkeypatch):
    """torch says a GPU is there; triton finds no driver for it: each kernel row names triton."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rows = kernel_check.kernel_rows(3, gpu="a GPU")
    assert [row.check for row in rows] == KERNEL_ROWS
    for row in rows:
        assert row.verdict == "unavailable" and "\n" not in row.note
        assert row.note.startswith("triton ") and "has no working GPU backend (" in row.note


def _tensorrt_without_plugins(monkeypatch) -> None:
    """A TensorRT 10.9 whose `tensorrt.plugin` does not import: what a host whose TensorRT cannot
    register ticknorm's plugin looks like, up to the first TensorRT call. The module appears when a
    TensorRT runner first imports it, after the probe's export (torch's exporter looks for TensorRT)."""
    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.9.0"

    def import_tensorrt():
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        return fake

    statuses = [RuntimeStatus(s.name, "10.9.0", True) if s.name == "trt" else s for s in runtime_statuses()]
    monkeypatch.setattr(host_check, "runtime_statuses", lambda: statuses)
    monkeypatch.setattr(trt_runner, "import_tensorrt", import_tensorrt)
    monkeypatch.setattr(trt_runner.TrtRunner, "check_available", lambda self: None)  # no GPU here


def test_tensorrt_without_its_plugin_is_one_line_and_the_rest_still_run(monkeypatch):
    _tensorrt_without_plugins(monkeypatch)
    checked = api.check_runtimes()
    rows = _rows(checked)
    for name in ("trt plugin", "trt-fp16 plugin"):  # both graphs were built (fp16: converted, then retargeted)
        assert rows[name].verdict == "unavailable"
        assert rows[name].note.startswith("trt: tensorrt.plugin cannot be imported (")
        assert rows[name].note.endswith("the ticknorm::LayerNorm plugin needs TensorRT 10.9 or newer")
    assert rows["trt"].verdict == "unavailable" and "TensorRT 10.9.0 has no Logger" in rows["trt"].note
    assert rows["ort-cpu"].verdict == "pass" and [row.check for row in checked.rows] == ROWS
    assert checked.exit_code == 0


@pytest.mark.gpu
def test_on_a_gpu_the_kernel_its_ptx_and_torch_cuda_pass(report):
    if not ON_GPU:
        pytest.skip("needs a CUDA GPU (none on this machine)")
    checked, seconds = report
    rows = _rows(checked)
    for name in ["torch-cuda", "torch-cuda-fp16", "torch-cuda-bf16", *KERNEL_ROWS]:
        assert rows[name].verdict == "pass", (name, rows[name].note)
    assert checked.host["gpu"] and checked.host["cuda_driver"]
    assert seconds < 180  # the bound on a GPU host
    assert np.isfinite([rows[name].median_ms for name in KERNEL_ROWS]).all()
