"""Profiler overhead, stability and coverage on a BERT-base-sized encoder at batch 1 (seq 128),
torch CPU and ORT CPU, and its "uninstrumented" end to end beside a plain ONNX Runtime session and
a plain PyTorch forward timed on their own, in the same process (also for the bundled tiny
example at 2x16). Targets: median overhead < 5%; per-module medians of two consecutive runs
within 10% for modules above 1% of the total; >= 95% of ORT time attributed to modules; the
profile's end to end within 10% of the plain one.

    python benchmarks/profiler_bert_base.py [--iterations 30] [--depth 2] [--overhead-runs 10]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from _models import bert_base
from ticknorm.exporter.export import ExportOptions, export_model
from ticknorm.profiler.profile import Timing, profile_runtimes
from ticknorm.runtime.registry import RunnerSetup


def plain_ms(model: onnx.ModelProto, module, feeds: dict, iterations: int) -> dict:
    """Median ms of a no_grad forward, then of a default ONNX Runtime session, each on its own: the
    forward first, as no ORT session (whose pool threads spin after a run) may exist beside it."""
    import onnxruntime
    import torch

    tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}
    with torch.no_grad():
        medians = {"torch": _median_ms(lambda: module(**tensors), iterations)}
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    medians["ort"] = _median_ms(lambda: session.run(None, feeds), iterations)
    return medians


def _median_ms(run, iterations: int) -> float:
    for _ in range(5):
        run()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def uninstrumented_vs_plain(label: str, module, feeds: dict, iterations: int, rounds: int) -> None:
    """The profile and the plain timings take turns `rounds` times, each short: this VM's speed
    drifts by tens of percent over tens of seconds, which one long profile followed by one long
    plain timing would read as a difference; the median of many short pairs does not."""
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "m.onnx"
        export_model(module, feeds, path, ExportOptions(exporter="torchscript", check=False))
        model = onnx.load(str(path))
    ratios = {"torch": [], "ort": []}
    for number in range(rounds):  # odd rounds time the plain run first: a drift in time hits both orders alike
        plain = plain_ms(model, module, feeds, iterations) if number % 2 else None
        run = profile_runtimes(model, feeds, ("torch", "ort"), RunnerSetup(module), Timing(iterations, 5, 2))
        plain = plain or plain_ms(model, module, feeds, iterations)
        for runtime in ratios:
            ratios[runtime].append((run.logs[runtime].end_to_end_ms / plain[runtime], run.logs[runtime]))
    for runtime, found in ratios.items():
        values = sorted(ratio for ratio, _ in found)
        log = found[-1][1]
        print(f"{label} {runtime}: profile's uninstrumented end to end / plain alone, {rounds} rounds taking turns: "
              f"median x{statistics.median(values):.3f} (each: {', '.join(f'x{v:.3f}' for v in values)}; target within "
              f"10%); last round overhead {log.overhead:+.1%}, coverage {log.coverage():.1%}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9, help="pairs of (profile, plain alone) for the end-to-end check")
    parser.add_argument("--overhead-runs", type=int, default=2, help="profiles whose overhead is printed (>= 2)")
    args = parser.parse_args()
    module = bert_base()
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 30522, (1, 128))}
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "bert.onnx"
        export_model(module, feeds, path, ExportOptions(exporter="torchscript", check=False))
        model = onnx.load(str(path))
    timing = Timing(args.iterations, 5, args.depth)
    runs = [profile_runtimes(model, feeds, ("torch", "ort"), RunnerSetup(module), timing)
            for _ in range(max(2, args.overhead_runs))]
    print(f"BERT-base-sized encoder, batch 1, seq 128, depth {args.depth}, {args.iterations} iterations, {len(runs)} runs")
    for runtime in ("torch", "ort"):
        first, second = (run.logs[runtime] for run in runs[:2])
        overheads = [run.logs[runtime].overhead for run in runs]
        print(f"\n{runtime}: end-to-end {first.end_to_end_ms:.2f} ms uninstrumented; overhead per run "
              f"{', '.join(f'{o:+.1%}' for o in overheads)}, median {statistics.median(overheads):+.1%}, "
              f"{sum(o < 0.05 for o in overheads)} of {len(runs)} under +5% (target < +5%); coverage "
              f"{first.coverage():.1%} / {second.coverage():.1%}")
        a, b = first.per_module(args.depth), second.per_module(args.depth)
        total = sum(t.median_ms for t in a.values())
        changes = {key: b[key].median_ms / timing.median_ms - 1 for key, timing in a.items()
                   if key in b and timing.median_ms > 0.01 * total}
        worst = max(changes, key=lambda key: abs(changes[key]))
        within = sum(abs(change) <= 0.10 for change in changes.values())
        print(f"  stability: {within} of {len(changes)} modules above 1% of the total agree within 10%; largest change "
              f"{changes[worst]:+.1%} at {worst} ({a[worst].median_ms:.2f} -> {b[worst].median_ms:.2f} ms); "
              f"end-to-end {first.end_to_end_ms:.2f} -> {second.end_to_end_ms:.2f} ms")
        total_b = sum(t.median_ms for t in b.values())
        shares = {key: (b[key].median_ms / total_b) / (a[key].median_ms / total) - 1 for key in changes}
        print(f"  as shares of each run's total (machine-wide drift removed): largest change "
              f"{max(abs(v) for v in shares.values()):.1%}")


    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from tiny_transformer import build

    print()
    uninstrumented_vs_plain("BERT-base-sized", module, feeds, 10, args.rounds)
    uninstrumented_vs_plain("tiny example 2x16", build().eval(), {"input_ids": np.random.default_rng(0).integers(0, 1000, (2, 16))},
                            100, args.rounds)


if __name__ == "__main__":
    main()
