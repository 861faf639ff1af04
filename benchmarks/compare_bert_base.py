"""`compare` on a BERT-base-sized encoder (108.5M parameters, input 1x128, ORT CPU): wall time of
the PyTorch reference and of ONNX Runtime, plain vs --per-layer, and peak memory (max RSS of a
fresh process per configuration, which builds the model and compares it from the file as
`ticknorm compare` does) of --per-layer with and without a depth limit. The fp32 weights are
434 MB: PyTorch's copy, and ONNX Runtime's (mapped from the file, its MatMul weights prepacked).

    python benchmarks/compare_bert_base.py
"""

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = [("plain", None), ("per-layer, depth 2", {"depth": 2}), ("per-layer, all modules", {})]


def child(model_path: str, options: str) -> None:
    """One configuration in this process, as `ticknorm compare` runs it (from the file); prints
    timings and the peak RSS of the comparison (measured before the single runs) as JSON."""
    import onnx
    from _models import bert_base
    from ticknorm import Inputs, LayerSelection, ModelRef, api
    from ticknorm.runtime.ort_runner import OrtRunner
    from ticknorm.runtime.torch_runner import TorchRunner

    options = json.loads(options)
    module = bert_base()
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 30522, (1, 128))}
    layers = LayerSelection(**options) if options is not None else None
    start = time.perf_counter()
    report = api.compare(model_path, ModelRef(module), Inputs(arrays=feeds), runtimes=["ort"], layers=layers)
    compare_seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = onnx.load(model_path)
    with TorchRunner(module, [o.name for o in model.graph.output]) as runner:
        start = time.perf_counter()
        runner.infer(feeds)
        torch_seconds = time.perf_counter() - start
    with OrtRunner(model) as runner:
        runner.infer(feeds)
        start = time.perf_counter()
        runner.infer(feeds)
        ort_seconds = time.perf_counter() - start
    print(json.dumps({"torch": torch_seconds, "ort": ort_seconds, "compare": compare_seconds,
                      "taps": len({row.module for row in report.layers}), "passed": report.passed,
                      "max_rss_mb": peak}))


def main():
    from _models import bert_base
    from ticknorm.exporter.export import ExportOptions, export_model

    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "bert.onnx"
        feeds = {"input_ids": np.random.default_rng(0).integers(0, 30522, (1, 128))}
        export_model(bert_base(), feeds, path, ExportOptions(exporter="torchscript", check=False))
        rows = []
        for label, options in CONFIGS:
            done = subprocess.run([sys.executable, __file__, "--child", str(path), json.dumps(options)],
                                  capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
            rows.append((label, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"{'configuration':<24} {'taps':>5} {'torch s':>8} {'ORT s':>7} {'compare s':>10} {'peak RSS MB':>12}")
    for label, r in rows:
        print(f"{label:<24} {r['taps']:>5} {r['torch']:>8.3f} {r['ort']:>7.3f} {r['compare']:>10.2f} {r['max_rss_mb']:>12.0f}")
    plain, shallow, full = (r for _, r in rows)
    print(f"ORT / torch single run: x{plain['ort'] / plain['torch']:.2f}")
    print(f"compare --per-layer / plain: x{full['compare'] / plain['compare']:.2f} (depth 2: x{shallow['compare'] / plain['compare']:.2f})")
    print(f"peak memory --per-layer / --per-layer --depth 2: x{full['max_rss_mb'] / shallow['max_rss_mb']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    else:
        main()
