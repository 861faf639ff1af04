"""`ticknorm export` (export + fuse + verify + PyTorch comparison + write) against the bare
`torch.onnx.export` of the same model with the same dynamic axes: a BERT-base-sized encoder
(108.5M parameters, hand-written LayerNorms, input 2x128, dynamic batch and sequence), both
exporters; or (`--model llama`) the ~1.1B-parameter Llama-shaped decoder of `large_model.py`
(TinyLlama's shape, random weights, input 1x32), dynamo. Each measurement is a fresh child
process that builds the model and exports it, so wall time and peak RSS are per process, as a
user sees them; the two take turns `--rounds` times and the medians are compared. ticknorm runs
the exporter in a forked child of its own: its peak RSS is the larger of the two processes', and
the peak of their PSS summed (what they hold together, shared pages once) is printed beside it.
Targets (issue 18): ticknorm within 1.5x the bare export's time and peak RSS (aim 1.25x), and at
the 1.1B model peak RSS <= 3x the fp32 weights; ONNX Runtime sessions per export <= 2; no
message ticknorm serializes holds all the weights.

    python benchmarks/export_bert_base.py [--rounds 2] [--exporter torchscript|dynamo|both]
    python benchmarks/export_bert_base.py --model llama --rounds 1
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
AXES = {"input_ids": {0: "batch", 1: "seq"}}


def child(kind: str, exporter: str, model_name: str, out: Path) -> dict:
    """Runs in the child process: build, export one way, report."""
    started = time.perf_counter()
    import torch

    tree = TreeMemory()

    model, feeds, axes = _build(model_name)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    built = time.perf_counter()
    counts = {}
    if kind == "bare":
        _bare_export(torch, model, feeds, axes, exporter, out / "bare.onnx")
    else:
        counts = _counted_export(model, feeds, axes, exporter, out)
    done = time.perf_counter()
    own, exporter = (resource.getrusage(who).ru_maxrss / 1024 for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return {"process_s": done - started, "build_s": built - started, "export_s": done - built, "weights_mb": weights / 2**20,
            "peak_rss_mb": max(own, exporter), "own_peak_rss_mb": own, "exporter_peak_rss_mb": exporter,
            "tree_peak_pss_mb": tree.stop(), **counts}


class TreeMemory:
    """The peak of the memory this process and its children hold together, sampled every 50 ms as
    the sum of their PSS (shared pages split between the processes that map them): ticknorm's
    exporter runs in a forked child sharing the model's weights copy-on-write, so per-process
    peak RSS alone would count those pages twice or hide the child."""

    def __init__(self):
        import psutil

        self.process, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        import psutil

        while not self.done.wait(0.05):
            total = 0
            for process in [self.process, *self.process.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak / 2**20


def _build(model_name: str):
    """The model, its feeds and dynamic axes, as `ticknorm export` would be given them."""
    import numpy as np

    if model_name == "bert":
        sys.path.insert(0, str(HERE))
        from _models import bert_base

        return bert_base(), {"input_ids": np.random.default_rng(0).integers(0, 30522, (2, 128))}, AXES
    import transformers

    from ticknorm.exporter.model_ref import ModelRef, task_feeds

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=512)
    model = ModelRef(transformers.LlamaForCausalLM(config)).load()
    feeds, axes = task_feeds(model, {"input_ids": np.random.default_rng(0).integers(0, 32000, (1, 32))}, AXES)
    return model, feeds, axes


def _bare_export(torch, model, feeds: dict, axes: dict, exporter: str, path: Path) -> None:
    """torch.onnx.export alone, with the arguments ticknorm gives it (the same inputs, names and
    dynamic axes; external data as the dynamo exporter writes it by default)."""
    from ticknorm.exporter.export import _arguments, _dynamic_shapes

    tensors = {name: torch.from_numpy(value) for name, value in feeds.items()}
    kwargs, structure, names = _arguments(model, tensors, axes)
    with torch.no_grad():
        if exporter == "dynamo":
            program = torch.onnx.export(model, (), kwargs=kwargs, dynamo=True, input_names=names, optimize=True,
                                        dynamic_shapes=_dynamic_shapes(torch, structure))
            program.save(str(path), external_data=True)
        else:
            torch.onnx.export(model, (), str(path), kwargs=kwargs, dynamo=False, opset_version=17, input_names=names,
                              dynamic_axes=axes, do_constant_folding=True)


def _counted_export(model, feeds: dict, axes: dict, exporter: str, out: Path) -> dict:
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

    # external data, as dynamo's default; the model's weights freed once exported, as `ticknorm export` does
    # for the models it loads itself
    options = ExportOptions(exporter=exporter, external_data_threshold=1 << 20, release_model=True)
    result = export_model(model, feeds, out / "ticknorm.onnx", options, axes, progress=progress)
    phases.append(["(end: file written)", time.perf_counter(), *_memory_mb()])
    timeline = [[message, end - start, rss_end, peak_end] for (message, start, _, _), (_, end, rss_end, peak_end)
                in zip(phases, phases[1:])]
    return {"sessions": len(sessions), "largest_serialized_mb": max(serialized, default=0) / 2**20,
            "fused": result.fusion.count("fused"), "max_error": max(c.max_abs for c in result.accuracy),
            "timeline": timeline}


def _memory_mb() -> tuple[float, float]:
    """(resident now, peak resident so far) of this process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


def measure(kind: str, exporter: str, model: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        run = subprocess.run([sys.executable, __file__, "--child", kind, "--exporter", exporter, "--model", model,
                              "--out", workdir],
                             capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if run.returncode:
        raise SystemExit(f"{kind} {exporter} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--exporter", choices=("torchscript", "dynamo", "both"), default="both")
    parser.add_argument("--model", choices=("bert", "llama"), default="bert")
    parser.add_argument("--child", choices=("bare", "ticknorm"))
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.exporter, args.model, Path(args.out))))
        return
    exporters = ("torchscript", "dynamo") if args.exporter == "both" and args.model == "bert" else (
        ("dynamo",) if args.exporter == "both" else (args.exporter,))
    described = {"bert": "BERT-base-sized encoder, 108.5M parameters, input 2x128",
                 "llama": "Llama-shaped decoder (TinyLlama's shape, ~1.1B parameters), input 1x32"}[args.model]
    print(f"{described}, dynamic batch/seq; {args.rounds} round(s) of bare and ticknorm taking turns, each a fresh "
          "process; both write external data")
    for exporter in exporters:
        runs = {"bare": [], "ticknorm": []}
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(measure(kind, exporter, args.model))
        bare, ours = ({key: statistics.median(r[key] for r in runs[kind]) for key in runs[kind][0] if key != "timeline"}
                      for kind in runs)
        print(f"\n{exporter}:")
        for label, row in (("bare torch.onnx.export", bare), ("ticknorm export", ours)):
            print(f"  {label:<24} process {row['process_s']:6.1f} s (build {row['build_s']:4.1f}, export "
                  f"{row['export_s']:5.1f}), peak RSS {row['peak_rss_mb']:6.0f} MB (process {row['own_peak_rss_mb']:.0f}, "
                  f"its exporter child {row['exporter_peak_rss_mb']:.0f}), peak PSS of both together "
                  f"{row['tree_peak_pss_mb']:.0f} MB")
        print(f"  ratio: time x{ours['process_s'] / bare['process_s']:.2f} (export alone x"
              f"{ours['export_s'] / bare['export_s']:.2f}), peak RSS x{ours['peak_rss_mb'] / bare['peak_rss_mb']:.2f}, "
              f"peak PSS together x{ours['tree_peak_pss_mb'] / bare['tree_peak_pss_mb']:.2f} "
              f"(targets <= 1.5, aim 1.25); ticknorm's peak is {ours['peak_rss_mb'] / ours['weights_mb']:.2f}x the fp32 "
              f"weights ({ours['weights_mb']:.0f} MB)")
        print(f"  ticknorm: {ours['sessions']:.0f} ONNX Runtime sessions (target <= 2), largest message it serialized "
              f"{ours['largest_serialized_mb']:.1f} MB (one tensor, or a graph of references; the weights are "
              f"{ours['weights_mb']:.0f} MB), {ours['fused']:.0f} norms fused, max |ORT - torch| {ours['max_error']:.2e}")
        print("  ticknorm phases (last round): seconds, resident MB at the phase's end, peak MB so far")
        for message, seconds, rss, peak in runs["ticknorm"][-1]["timeline"]:
            print(f"    {seconds:6.2f} s  {rss:6.0f} MB  peak {peak:6.0f} MB  {message}")


if __name__ == "__main__":
    main()
