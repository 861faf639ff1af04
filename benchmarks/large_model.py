"""A Llama-shaped decoder built locally from a config (random weights), exported the way `ticknorm
export` does (export + RMSNorm fusion + verification + PyTorch comparison + write, external data),
with wall time and peak RSS per phase, peak RSS as a multiple of the fp32 weights' bytes.

    python benchmarks/large_model.py                # ~1.1B parameters (the real-models issue's goal)
    python benchmarks/large_model.py --layers 4     # the same widths, fewer layers, a quick look

Goal: finishes on a 24 GiB machine with peak RSS <= 3x the fp32 weights.
"""

import argparse
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import transformers

from ticknorm.exporter.export import ExportOptions, export_model
from ticknorm.exporter.model_ref import ModelRef, task_feeds


class PhaseClock:
    """Wall time and peak RSS of each phase `export_model` reports through its progress callback;
    RSS sampled every 50 ms by a thread, so peaks between messages are seen."""

    def __init__(self):
        self.process = psutil.Process()
        self.phases = []  # [name, start, peak bytes]
        self.stop = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self.stop.wait(0.05):
            if self.phases:
                self.phases[-1][2] = max(self.phases[-1][2], self.process.memory_info().rss)

    def __call__(self, message: str):
        self.phases.append([message, time.perf_counter(), self.process.memory_info().rss])

    def report(self, end: float, weights: int):
        rows = []
        for (name, start, peak), following in zip(self.phases, self.phases[1:] + [[None, end, 0]]):
            rows.append(f"  {following[1] - start:8.1f} s  peak RSS {peak / 2**30:6.2f} GiB "
                        f"({peak / weights:4.2f}x weights)  {name}")
        return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)  # TinyLlama-1.1B's shape
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--exporter", default="dynamo")
    args = parser.parse_args()
    clock = PhaseClock()
    clock.sampler.start()
    clock("building the model from its config")
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                      num_key_value_heads=args.hidden // 256, max_position_embeddings=512)
    model = ModelRef(transformers.LlamaForCausalLM(config)).load()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"Llama-shaped decoder: {weights / 4e9:.2f}B parameters, {weights / 2**30:.2f} GiB of fp32 weights, "
          f"{args.layers} layers, hidden {args.hidden}; input 1x32; {args.exporter} exporter")
    feeds, axes = task_feeds(model, {"input_ids": np.random.default_rng(0).integers(0, args.vocab, (1, 32))},
                             {"input_ids": {0: "batch", 1: "seq"}})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        # the model freed once exported, as `ticknorm export` does for the models it loads itself
        options = ExportOptions(exporter=args.exporter, external_data_threshold=1 << 20, release_model=True)
        result = export_model(model, feeds, Path(workdir) / "llama.onnx", options, axes, progress=clock)
        clock("writing done")
        end = time.perf_counter()
        files = {p.name: p.stat().st_size for p in Path(workdir).iterdir()}
    clock.stop.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the dynamo exporter's forked child
    print(f"total {end - start:.1f} s; peak RSS {peak / 2**30:.2f} GiB = {peak / weights:.2f}x the fp32 weights "
          f"(goal <= 3x), the exporter's child {child / 2**30:.2f} GiB = {child / weights:.2f}x (it shares this "
          f"process's weights copy-on-write); files {files}")
    print(f"RMSNorms fused {result.fusion.count('fused')}, max |ORT - torch| {max(c.max_abs for c in result.accuracy):.2e}")
    print(clock.report(end, weights))


if __name__ == "__main__":
    main()
