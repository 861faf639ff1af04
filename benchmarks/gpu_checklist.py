"""Every check of ticknorm that needs a GPU, in one command for the few minutes a GPU is lent: the
GPU tests, `runtimes --check`, the kernel benchmark on a reduced sweep, and the CUDA-event profile
of the BERT-base-sized encoder. A lent GPU leaves no minutes for writing or debugging anything, so
what runs there is this plan, written and rehearsed beforehand on a CPU host with --dry-run (CI
runs it so).

    timeout 540 python benchmarks/gpu_checklist.py --out OUT      # on the GPU host, from the repo root
    python benchmarks/gpu_checklist.py --dry-run --out OUT         # anywhere: the plan, and the steps that need no GPU

Each step is a child process of its own, run from the repo root with PYTHONPATH set to it (so
ticknorm need not be installed there: no network, no `pip install -e .`), with its own timeout inside one overall budget, so one
hang costs its own minutes only; a step whose Python modules are missing is skipped with their
names. Its wall time is printed as it ends. OUT gets summary.txt (steps, then the figures),
summary.json, steps.log (every step's output) and each step's figures: host.json,
runtimes_check.json, ln_kernel.json, cuda_profile.json. Exit 0 when every step that ran passed.

This script itself needs nothing but the standard library: it must report, not trip over, what
the host lacks."""

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_atomic():
    """ticknorm's atomic writes, loaded from their file: importing the package would import onnx
    and numpy, which this script must not need."""
    spec = importlib.util.spec_from_file_location("ticknorm_atomic", REPO / "ticknorm" / "base" / "atomic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


atomic = _load_atomic()
BUDGET_S = 450  # under 8 minutes with the start of every child included
LEAST_USEFUL_S = 20  # a step given less than this would only time out
TAIL = 4000  # characters of a step's output kept in summary.json


@dataclass(frozen=True)
class Step:
    name: str
    what: str  # one line for the plan
    argv: tuple  # run from the repo root; "{python}" and "{out}" are filled in
    timeout_s: int
    needs: tuple = ()  # Python modules the step imports
    cuda: bool = True  # meaningful only on a CUDA host: the dry run plans it and runs it not
    stdout_to: str | None = None  # a file in OUT for its stdout: steps that print their figures as JSON


STEPS = (
    Step("host", "versions, GPU, CUDA driver", ("{python}", "benchmarks/gpu_checklist.py", "--host-facts"), 60,
         ("torch", "numpy", "onnx"), cuda=False, stdout_to="host.json"),
    Step("runtimes-check", "ticknorm runtimes --check --json: every runtime, the Triton kernel and its PTX launched",
         ("{python}", "-m", "ticknorm.cli", "runtimes", "--check", "--json"), 150,
         ("torch", "onnx", "onnxruntime", "onnxscript", "click", "rich", "ml_dtypes"), cuda=False,
         stdout_to="runtimes_check.json"),
    Step("ln-kernel", "benchmarks/ln_kernel.py: kernel vs F.layer_norm vs D2D copy, hidden 768/1024/4096/8192, "
         "fp16+bf16; launch sweep at 1024 and 4096",
         ("{python}", "benchmarks/ln_kernel.py", "--hidden", "768,1024,4096,8192", "--dtypes", "fp16,bf16",
          "--iterations", "50", "--sweep", "--sweep-hidden", "1024,4096", "--json", "{out}/ln_kernel.json"), 150,
         ("torch", "triton")),
    Step("cuda-profile", "benchmarks/profile_torch_cuda.py: BERT-base-sized encoder on torch-cuda, CUDA events vs host",
         ("{python}", "benchmarks/profile_torch_cuda.py", "--json", "{out}/cuda_profile.json"), 150,
         ("torch", "onnx", "onnxruntime", "ml_dtypes", "rich")),
    Step("kernel-tests", "pytest tests/test_ln_kernel.py: the kernel grid compiled for this GPU, F.layer_norm on it",
         ("{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ln_kernel.py"), 210,
         ("pytest", "torch", "triton")),
    Step("gpu-tests", "pytest -m gpu: the tests that skip without a CUDA GPU (PTX launch, TensorRT, runtimes --check)",
         ("{python}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "--continue-on-collection-errors",
          "tests", "--ignore", "tests/test_ln_kernel.py"), 150, ("pytest", "torch")),
)


@dataclass
class Outcome:
    name: str
    status: str  # passed, failed, timed out, skipped, planned
    seconds: float = 0.0
    returncode: int | None = None
    reason: str = ""
    command: str = ""
    tail: str = field(default="", repr=False)


def command(step: Step, out: Path) -> list[str]:
    return [part.replace("{python}", sys.executable).replace("{out}", str(out)) for part in step.argv]


def missing_modules(step: Step) -> list[str]:
    return [name for name in step.needs if importlib.util.find_spec(name) is None]


def run_step(step: Step, out: Path, timeout_s: float, log) -> Outcome:
    """The step as a child in its own process group, killed whole at its timeout; its output goes
    to `log` (an open file) and its last lines into the outcome."""
    argv = command(step, out)
    outcome = Outcome(step.name, "passed", command=" ".join(argv))
    missing = missing_modules(step)
    if missing:
        outcome.status, outcome.reason = "skipped", f"module(s) not installed here: {', '.join(missing)}"
        return outcome
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    child = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # it may have ended on its own meanwhile
            os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        outcome.status, outcome.reason = "timed out", f"stopped after its {timeout_s:.0f} s"
    outcome.seconds = time.perf_counter() - started
    outcome.returncode = child.returncode
    if outcome.status == "passed" and child.returncode != 0:
        outcome.status, outcome.reason = "failed", f"exit {child.returncode}"
    if step.stdout_to and stdout.strip():
        atomic.write_text(out / step.stdout_to, stdout)
    log.write(f"===== {step.name}: {outcome.status} in {outcome.seconds:.1f} s: {outcome.command}\n{stdout}{stderr}\n")
    outcome.tail = (stdout + stderr)[-TAIL:]
    return outcome


def plan_line(step: Step, out: Path) -> str:
    needs = f"; needs {', '.join(step.needs)}" if step.needs else ""
    gpu = "GPU" if step.cuda else "any host"
    return f"  {step.name:<15} {step.timeout_s:>4} s  {gpu:<8} {step.what}{needs}\n      $ {' '.join(command(step, out))}"


def run(out: Path, dry_run: bool, budget_s: float) -> list[Outcome]:
    print(f"GPU checklist: {len(STEPS)} steps within {budget_s:.0f} s{' (dry run)' if dry_run else ''}, figures to {out}")
    for step in STEPS:
        print(plan_line(step, out))
    started, outcomes, cuda = time.perf_counter(), [], None
    with (out / "steps.log").open("w") as log:
        for step in STEPS:
            left = budget_s - (time.perf_counter() - started)
            if step.cuda and (dry_run or cuda is False):
                reason = "dry run" if dry_run else "no CUDA device visible to torch here"
                outcome = Outcome(step.name, "planned" if dry_run else "skipped", reason=reason,
                                  command=" ".join(command(step, out)))
            elif left < LEAST_USEFUL_S:
                outcome = Outcome(step.name, "skipped", reason=f"{left:.0f} s of the budget left",
                                  command=" ".join(command(step, out)))
            else:
                outcome = run_step(step, out, min(step.timeout_s, left), log)
            if step.name == "host":
                cuda = _read(out / "host.json").get("cuda")
            print(f"{outcome.name:<15} {outcome.status:<9} {outcome.seconds:6.1f} s  {outcome.reason}", flush=True)
            outcomes.append(outcome)
    return outcomes


def figures(out: Path) -> list[str]:
    """What a lent GPU is for, read back from the steps' files into lines a reader compares with
    the goals in benchmarks/README.md (a step that wrote nothing adds nothing)."""
    lines = []
    host = _read(out / "host.json")
    if host:
        lines.append("host: " + ", ".join(f"{key} {value}" for key, value in host.items()))
    check = _read(out / "runtimes_check.json")
    for row in check.get("rows", []):
        error = "-" if row["max_error"] is None else f"{row['max_error']:.2g}"
        ms = "-" if row["median_ms"] is None else f"{row['median_ms']:.3f} ms"
        lines.append(f"runtimes --check  {row['check']:<26} {row['verdict']:<11} max error {error:<8} {ms:<11} {row['note']}")
    if check:
        lines.append(f"runtimes --check  {check['verdict']}")
    kernel = _read(out / "ln_kernel.json")
    for row in kernel.get("results", []):
        lines.append(f"ln_kernel  {row['dtype']} hidden {row['hidden']:>5}: {row['of_copy']:.1%} of D2D copy bandwidth, "
                     f"{row['speedup']:.2f}x F.layer_norm, goals: {', '.join(row['missed']) or 'met'}")
    for found in kernel.get("sweeps", []):
        best = found["results"][0]
        lines.append(f"ln_kernel  sweep {found['dtype']} {found['hidden']}: best rows={best['rows']} warps={best['warps']} "
                     f"{best['ms'] * 1e3:.1f} us")
    profile = _read(out / "cuda_profile.json")
    if profile:
        cuda = profile["profile"]["runtimes"]["torch-cuda"]
        lines.append(f"cuda profile  BERT-base {profile['batch']}x{profile['seq']}: plain forward host "
                     f"{profile['plain']['host_ms']:.3f} ms, CUDA events {profile['plain']['cuda_event_ms']:.3f} ms; profile "
                     f"end to end {cuda['end_to_end_ms']:.3f} ms (x{profile['profile_end_to_end_over_plain_host']:.3f} of "
                     f"plain), coverage {cuda['coverage']:.1%}, overhead {cuda['overhead']:+.1%}")
    return lines or ["no figures were written"]


def write_summary(out: Path, outcomes: list, budget_s: float) -> str:
    steps = [f"{o.name:<15} {o.status:<9} {o.seconds:6.1f} s  {o.reason}" for o in outcomes]
    total = sum(o.seconds for o in outcomes)
    text = "\n".join(["steps:", *steps, f"total {total:.1f} s of a {budget_s:.0f} s budget", "", "figures:", *figures(out)])
    atomic.write_text(out / "summary.txt", text + "\n")
    atomic.write_text(out / "summary.json", json.dumps({"budget_s": budget_s, "total_s": total,
                                                      "steps": [asdict(o) for o in outcomes]}, indent=2))
    return text


def host_facts() -> dict:
    """What the figures were measured on; run as a step of its own, since it imports torch."""
    import importlib.metadata
    import platform

    import torch

    from ticknorm.plugins.aot import driver_version

    facts = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
             "cuda_driver": driver_version()}
    if facts["cuda"]:
        facts.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                     torch_cuda=torch.version.cuda)
    for name in ("triton", "onnxruntime", "tensorrt", "cupy", "onnxscript", "polygraphy", "click", "rich"):
        try:
            facts[name] = importlib.metadata.version(name) if importlib.util.find_spec(name) else None
        except importlib.metadata.PackageNotFoundError:  # installed under another name (onnxruntime-gpu, cupy-cuda13x)
            facts[name] = "installed"
    return facts


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_checklist_out"), help="Folder for the figures and logs.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Print the plan and run only the steps that need no GPU (what CI runs).")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="Seconds for all the steps together.")
    parser.add_argument("--host-facts", action="store_true", help="Print this host's versions as JSON (the first step).")
    args = parser.parse_args()
    if args.host_facts:
        print(json.dumps(host_facts()))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = run(args.out.resolve(), args.dry_run, args.budget)
    print("\n" + write_summary(args.out, outcomes, args.budget))
    return 0 if all(o.status in ("passed", "planned", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
