"""What `compare` and `profile` cost beyond the work they cannot skip, on a BERT-base-sized encoder
(108.5M parameters, input 1x128, a ticknorm export on disk), in one process: the floor is one
PyTorch forward + building one ONNX Runtime session from the file + one ORT run, timed bare;
`compare` (ort) and `profile` (torch and ort, 1 timed iteration, no warm-up) through the API are
timed beside it, taking turns `--rounds` times. Target (issue 18): each within 2x the floor. A
profile times each runtime plain and instrumented, so it is also shown against the floor of that
work (2 forwards, one session, 2 runs).

    python benchmarks/command_overhead.py [--rounds 3]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from _models import bert_base


def floor_s(module, path: Path, feeds: dict, runs: int = 1) -> float:
    """`runs` PyTorch forwards, one ORT session built from the file, `runs` ORT runs."""
    import onnxruntime
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(runs):
            module(torch.from_numpy(feeds["input_ids"]))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    return time.perf_counter() - start


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from ticknorm import Inputs, ModelRef, Timing, api
    from ticknorm.exporter.export import ExportOptions, export_model

    module = bert_base()
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 30522, (1, 128))}
    inputs = Inputs(arrays=feeds)
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "bert.onnx"
        export_model(module, feeds, path, ExportOptions(exporter="torchscript"))
        runs = {"floor": [], "floor2": [], "compare": [], "profile": []}
        for _ in range(args.rounds):
            runs["floor"].append(floor_s(module, path, feeds))
            runs["floor2"].append(floor_s(module, path, feeds, runs=2))
            runs["compare"].append(timed(lambda: api.compare(path, ModelRef(module), inputs, runtimes=["ort"])))
            runs["profile"].append(timed(lambda: api.profile(path, ModelRef(module), inputs, runtimes=["torch", "ort"],
                                                             timing=Timing(iterations=1, warmup=0))))
    floor = statistics.median(runs["floor"])
    print(f"BERT-base-sized encoder, input 1x128, {args.rounds} rounds taking turns (medians)")
    print(f"  floor (torch forward + ORT session from the file + ORT run): {floor:.2f} s")
    floor2 = statistics.median(runs["floor2"])
    print(f"  floor of a profile (what one plain and one instrumented iteration per runtime cannot skip: 2 torch "
          f"forwards + one session + 2 ORT runs): {floor2:.2f} s")
    for name in ("compare", "profile"):
        value = statistics.median(runs[name])
        print(f"  {name:<8} {value:.2f} s = x{value / floor:.2f} the floor (target <= 2)"
              + (f", x{value / floor2:.2f} the profile's floor" if name == "profile" else ""))


if __name__ == "__main__":
    main()
