"""ONNX Runtime CPU latency before vs after ticknorm's fusion, for a BERT-base-sized encoder
with hand-written LayerNorms exported by dynamo at opset 18, and how many of those LayerNorms
ORT's own optimizer (ORT_ENABLE_ALL) fuses by itself. Two spellings: `d * rsqrt(mean(d*d) + eps)`,
which ORT's optimizer does not fuse (the case ticknorm is for), and `d / sqrt(mean(d**2) + eps)`,
which it does (a control: there the ratio should be about 1).

    python benchmarks/ort_latency.py [--layers 12] [--seq 128] [--iterations 30]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from _models import Encoder, MulRsqrt, PowSqrtDiv
from ticknorm.exporter.export import torch_to_onnx
from ticknorm.exporter.fusion import fuse_norms

_NORM_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization")


def session(model: onnx.ModelProto, workdir: Path, name: str):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(workdir / f"{name}.ort.onnx")
    created = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    return created, sum(n.op_type in _NORM_OPS for n in optimized.graph.node)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=30)
    args = parser.parse_args()
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 30522, (1, args.seq))}
    print(f"encoder: {args.layers} layers, hidden 768, batch 1, seq {args.seq}, opset 18 (dynamo), ORT {ort.__version__} CPU")
    for label, norm in (("mul-rsqrt", MulRsqrt), ("pow-sqrt-div", PowSqrtDiv)):
        measure(label, Encoder(layers=args.layers, norm=norm), feeds, args.iterations)
    print("\nThe LayerNorm alone (where the encoder's MatMuls do not hide it): input 8x512x768")
    alone = {"x": np.random.default_rng(0).standard_normal((8, 512, 768)).astype(np.float32)}
    measure("mul-rsqrt", MulRsqrt(shape=(768,)), alone, args.iterations)


def measure(label: str, module, feeds: dict, iterations: int) -> None:
    model = torch_to_onnx(module, feeds, "dynamo", opset=18)
    fused = fuse_norms(model, feeds=feeds)
    layer_norms = fused.report.count("fused")
    with tempfile.TemporaryDirectory() as workdir:
        plain, ort_fused = session(model, Path(workdir), "plain")
        ours, _ = session(fused.model, Path(workdir), "fused")
    times = {"exported": [], "ticknorm-fused": []}
    for runner in (plain, ours):
        runner.run(None, feeds)  # warm-up
    for _ in range(iterations):  # interleaved, so drift in machine load hits both alike
        for name, runner in (("exported", plain), ("ticknorm-fused", ours)):
            start = time.perf_counter()
            runner.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    print(f"\nLayerNorm spelled {label}: {layer_norms} decomposed; fused by ORT_ENABLE_ALL itself: {ort_fused}; "
          f"by ticknorm: {layer_norms}")
    for name, samples in times.items():
        print(f"{name:>15}: median {1000 * statistics.median(samples):8.2f} ms, min {1000 * min(samples):8.2f} ms")
    ratio = statistics.median(times["exported"]) / statistics.median(times["ticknorm-fused"])
    print(f"speed-up (median exported / median fused): x{ratio:.3f}")


if __name__ == "__main__":
    main()
