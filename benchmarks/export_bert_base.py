"""`ticknorm export` (export + fuse + verify + PyTorch comparison + write) against the bare
`torch.onnx.export` of the same BERT-base-sized encoder (108.5M parameters, hand-written
LayerNorms, input 2x128, dynamic batch and sequence axes), with both exporters. Each measurement
is a fresh child process that builds the model and exports it, so wall time and peak RSS are per
process, as a user sees them; the two take turns `--rounds` times and the medians are compared.
Targets (issue 18): ticknorm within 1.5x the bare export's time and peak RSS (aim 1.25x); ONNX
Runtime sessions per export <= 2; weights serialized by ticknorm before the final write: never.

    python benchmarks/export_bert_base.py [--rounds 2] [--exporter torchscript|dynamo|both]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
AXES = {"input_ids": {0: "batch", 1: "seq"}}


def child(kind: str, exporter: str, out: Path) -> dict:
    """Runs in the child process: build, export one way, report."""
    started = time.perf_counter()
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from _models import bert_base

    model = bert_base()
    ids = np.random.default_rng(0).integers(0, 30522, (2, 128))
    built = time.perf_counter()
    counts = {}
    if kind == "bare":
        with torch.no_grad():
            if exporter == "dynamo":
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
                program = torch.onnx.export(model, (torch.from_numpy(ids),), dynamo=True, input_names=["input_ids"],
                                            dynamic_shapes={"input_ids": {0: batch, 1: seq}}, optimize=True)
                program.save(str(out / "bare.onnx"), external_data=True)
            else:
                torch.onnx.export(model, (torch.from_numpy(ids),), str(out / "bare.onnx"), dynamo=False, opset_version=17,
                                  input_names=["input_ids"], dynamic_axes=AXES, do_constant_folding=True)
    else:
        counts = _counted_export(model, {"input_ids": ids}, exporter, out)
    done = time.perf_counter()
    return {"process_s": done - started, "build_s": built - started, "export_s": done - built,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **counts}


def _counted_export(model, feeds: dict, exporter: str, out: Path) -> dict:
    """ticknorm's export, counting ONNX Runtime sessions and the model bytes ticknorm serializes
    before the final write (what protobuf copies: the staged graph holds references only)."""
    import onnx
    import onnxruntime

    from ticknorm.exporter.export import ExportOptions, export_model

    sessions, serialized = [], []
    session_class, serialize = onnxruntime.InferenceSession, onnx.ModelProto.SerializeToString

    class Counted(session_class):
        def __init__(self, *args, **kwargs):
            sessions.append(1)
            super().__init__(*args, **kwargs)

    def counted(message, **kwargs):
        data = serialize(message, **kwargs)
        serialized.append(len(data))
        return data

    onnxruntime.InferenceSession, onnx.ModelProto.SerializeToString = Counted, counted
    phases = []

    def progress(message):  # each phase's start: wall time, resident memory, and the peak so far
        phases.append([message, time.perf_counter(), *_memory_mb()])

    result = export_model(model, feeds, out / "ticknorm.onnx", ExportOptions(exporter=exporter), AXES, progress=progress)
    phases.append(["(end: file written)", time.perf_counter(), *_memory_mb()])
    timeline = [[message, end - start, rss_end, peak_end] for (message, start, _, _), (_, end, rss_end, peak_end)
                in zip(phases, phases[1:])]
    return {"sessions": len(sessions), "largest_serialized_mb": max(serialized[:-1], default=0) / 2**20,
            "fused": result.fusion.count("fused"), "max_error": max(c.max_abs for c in result.accuracy),
            "timeline": timeline}


def _memory_mb() -> tuple[float, float]:
    """(resident now, peak resident so far) of this process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


def measure(kind: str, exporter: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        run = subprocess.run([sys.executable, __file__, "--child", kind, "--exporter", exporter, "--out", workdir],
                             capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if run.returncode:
        raise SystemExit(f"{kind} {exporter} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--exporter", choices=("torchscript", "dynamo", "both"), default="both")
    parser.add_argument("--child", choices=("bare", "ticknorm"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.exporter, Path(args.out))))
        return
    exporters = ("torchscript", "dynamo") if args.exporter == "both" else (args.exporter,)
    print(f"BERT-base-sized encoder, 108.5M parameters, input 2x128, dynamic batch/seq; {args.rounds} round(s) of "
          "bare and ticknorm taking turns, each a fresh process")
    for exporter in exporters:
        runs = {"bare": [], "ticknorm": []}
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(measure(kind, exporter))
        bare, ours = ({key: statistics.median(r[key] for r in runs[kind]) for key in runs[kind][0] if key != "timeline"}
                      for kind in runs)
        print(f"\n{exporter}:")
        for label, row in (("bare torch.onnx.export", bare), ("ticknorm export", ours)):
            print(f"  {label:<24} process {row['process_s']:6.1f} s (build {row['build_s']:4.1f}, export "
                  f"{row['export_s']:5.1f}), peak RSS {row['peak_rss_mb']:6.0f} MB")
        print(f"  ratio: time x{ours['process_s'] / bare['process_s']:.2f} (export alone x"
              f"{ours['export_s'] / bare['export_s']:.2f}), peak RSS x{ours['peak_rss_mb'] / bare['peak_rss_mb']:.2f} "
              "(targets <= 1.5, aim 1.25)")
        print(f"  ticknorm: {ours['sessions']:.0f} ONNX Runtime sessions (target <= 2), largest model serialized before "
              f"the final write {ours['largest_serialized_mb']:.2f} MB (references only), {ours['fused']:.0f} "
              f"LayerNorms fused, max |ORT - torch| {ours['max_error']:.2e}")
        print("  ticknorm phases (last round): seconds, resident MB at the phase's end, peak MB so far")
        for message, seconds, rss, peak in runs["ticknorm"][-1]["timeline"]:
            print(f"    {seconds:6.2f} s  {rss:6.0f} MB  peak {peak:6.0f} MB  {message}")


if __name__ == "__main__":
    main()
