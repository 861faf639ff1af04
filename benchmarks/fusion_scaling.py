"""Fusion time against depth: decomposed encoders of 12, 48 and 96 layers (TorchScript export,
2 LayerNorms a layer). Target: linear growth, 96 layers under 1 s (matching + rewrite; the
ONNX Runtime verification is timed apart because it runs the model twice).

    python benchmarks/fusion_scaling.py
"""

import gc
import time

import numpy as np
import onnx_ir as ir
import torch

from _models import Encoder
from ticknorm.exporter.export import torch_to_onnx
from ticknorm.base.graph import inferred_types
from ticknorm.exporter.fusion import fuse_norms


def main():
    feeds = {"input_ids": np.ones((1, 16), np.int64)}
    rows = []
    for layers in (12, 48, 96):
        torch.manual_seed(0)
        model = torch_to_onnx(Encoder(layers=layers, hidden=64, heads=4, vocab=100), feeds, "torchscript")
        fuse_times = []
        for _ in range(3):
            start = time.perf_counter()
            result = fuse_norms(model, verify=False)
            fuse_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        verified = fuse_norms(model, feeds=feeds)
        verify_time = time.perf_counter() - start - min(fuse_times)
        assert verified.report.count("fused") == 2 * layers + 1
        rows.append((layers, len(model.graph.node), result.report.count("fused"), min(fuse_times), verify_time))
    print(f"{'layers':>6} {'nodes':>6} {'fused':>6} {'fuse s':>8} {'ms/layer':>9} {'verify s':>9}")
    for layers, nodes, fused, seconds, verify in rows:
        print(f"{layers:>6} {nodes:>6} {fused:>6} {seconds:>8.3f} {1000 * seconds / layers:>9.2f} {verify:>9.3f}")
    base_layers, base_time = rows[0][0], rows[0][3]
    for layers, *_, seconds, _verify in rows[1:]:
        print(f"{layers}/{base_layers} layers: time x{seconds / base_time:.2f} for depth x{layers / base_layers:.0f} "
              f"(linear = x{layers / base_layers:.0f})")
    print(f"96 layers: {rows[-1][3]:.3f} s (target < 1 s): {'PASS' if rows[-1][3] < 1.0 else 'FAIL'}")
    read, infer = (min(_seconds(step, model) for _ in range(3)) for step in (ir.from_proto, inferred_types))
    print(f"96 layers, the floor fusion stands on: reading into onnx-ir {read:.3f} s, ONNX shape inference "
          f"{infer:.3f} s ({(read + infer) / rows[-1][3]:.0%} of fusing)")


def _seconds(step, model) -> float:
    """One step's time with the collector paused, as fusion runs it."""
    gc.disable()
    try:
        start = time.perf_counter()
        step(model)
        return time.perf_counter() - start
    finally:
        gc.enable()


if __name__ == "__main__":
    main()
