"""benchmarks/gpu_checklist.py rehearsed here, since on a lent GPU there is no time to debug it: the
dry run prints the whole plan, runs the steps that need no GPU and writes the summary; a step that
hangs is killed with its children at its timeout; a step whose modules are missing is skipped."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_checklist.py"
GPU_STEPS = ("ln-kernel", "cuda-profile", "kernel-tests", "gpu-tests")


@pytest.fixture(scope="module")
def checklist():
    spec = importlib.util.spec_from_file_location("gpu_checklist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the dry run's steps need torch")
def test_dry_run_prints_the_plan_runs_what_needs_no_gpu_and_writes_the_summary(tmp_path):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert seconds < 60
    plan = done.stdout.split("\nhost ", 1)[0]
    assert plan.splitlines()[0].startswith("GPU checklist: 6 steps within 450 s (dry run)")
    for step in ("host", "runtimes-check", *GPU_STEPS):
        assert f"\n  {step} " in plan
    assert "-m ticknorm.cli runtimes --check --json" in plan and "-m pytest -q -p no:cacheprovider -m gpu" in plan
    assert "benchmarks/ln_kernel.py --hidden 768,1024,4096,8192" in plan and f"--json {tmp_path}/ln_kernel.json" in plan
    summary = (tmp_path / "summary.txt").read_text()
    steps = {line.split()[0]: line.split()[1] for line in summary.split("\n\n")[0].splitlines()[1:-1]}
    assert steps == {"host": "passed", "runtimes-check": "passed", **{step: "planned" for step in GPU_STEPS}}
    assert "runtimes --check  ort-cpu" in summary and "runtimes --check  PASS: " in summary
    written = json.loads((tmp_path / "summary.json").read_text())
    assert [s["name"] for s in written["steps"]] == ["host", "runtimes-check", *GPU_STEPS]
    check = json.loads((tmp_path / "runtimes_check.json").read_text())
    assert check["exit_code"] == 0 and any(row["check"] == "ort-cpu" for row in check["rows"])
    assert json.loads((tmp_path / "host.json").read_text())["torch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.json", "runtimes_check.json", "steps.log",
                                                           "summary.json", "summary.txt"]


def test_a_hanging_step_is_killed_with_its_children_at_its_timeout(checklist, tmp_path):
    grandchild = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
    step = checklist.Step("hang", "sleeps", ("{python}", "-c", grandchild), 60, cuda=False)
    started = time.perf_counter()
    with (tmp_path / "log").open("w") as log:
        outcome = checklist.run_step(step, tmp_path, 1, log)
    assert time.perf_counter() - started < 15  # the grandchild holding the pipe was killed too
    assert (outcome.status, outcome.reason) == ("timed out", "stopped after its 1 s")


def test_a_step_whose_modules_are_missing_is_skipped_with_their_names(checklist, tmp_path):
    step = checklist.Step("needs", "imports", ("{python}", "-c", "pass"), 60, ("ticknorm_no_such_module",), cuda=False)
    outcome = checklist.run_step(step, tmp_path, 10, None)
    assert (outcome.status, outcome.reason) == ("skipped", "module(s) not installed here: ticknorm_no_such_module")


def test_a_failing_step_fails_the_checklist_with_its_exit_code(checklist, tmp_path):
    step = checklist.Step("fails", "exits 3", ("{python}", "-c", "import sys; print('said'); sys.exit(3)"), 60, cuda=False)
    with (tmp_path / "log").open("w") as log:
        outcome = checklist.run_step(step, tmp_path, 30, log)
    assert (outcome.status, outcome.reason, outcome.returncode) == ("failed", "exit 3", 3)
    assert "said" in outcome.tail and "===== fails: failed" in (tmp_path / "log").read_text()
