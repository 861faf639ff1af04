"""Wall time of export + fuse + verify + PyTorch comparison for a BERT-base-sized encoder
(110M parameters, 25 hand-written LayerNorms), per stage, with both exporters.

    python benchmarks/export_bert_base.py
"""

import tempfile
import time
from pathlib import Path

import numpy as np

from _models import bert_base
from ticknorm.exporter.export import ExportOptions, export_model


def main():
    model = bert_base()
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 30522, (2, 128))}
    print(f"BERT-base-sized encoder: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, input 2x128")
    for exporter in ("torchscript", "dynamo"):
        stages, last = [], [time.perf_counter()]

        def progress(message, stages=stages, last=last):
            now = time.perf_counter()
            if stages:
                stages[-1][1] = now - last[0]
            stages.append([message, 0.0])
            last[0] = now

        with tempfile.TemporaryDirectory() as workdir:
            start = time.perf_counter()
            result = export_model(model, feeds, Path(workdir) / "bert.onnx", ExportOptions(exporter=exporter),
                                  {"input_ids": {0: "batch", 1: "seq"}}, progress=progress)
            total = time.perf_counter() - start
        stages[-1][1] = time.perf_counter() - last[0]
        print(f"\n{exporter}: total {total:.1f} s, LayerNorms fused {result.fusion.count('fused')}, "
              f"max |ORT - torch| {max(c.max_abs for c in result.accuracy):.2e}")
        for message, seconds in stages:
            print(f"  {seconds:7.2f} s  {message} (+ writing the file, in the last stage)" if message == stages[-1][0]
                  else f"  {seconds:7.2f} s  {message}")


if __name__ == "__main__":
    main()
