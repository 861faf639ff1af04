"""fp32 vs fp16 vs bf16 exports side by side, and the same model through the anchors that are
installed (onnxconverter-common's float16, ModelOpt AutoCast; see _anchors.py), for a
BERT-base-sized encoder and a held-in decoder LLM (a Llama built from a config).

Per row: error against PyTorch fp32 (max and mean per output; the worst module, for graphs ONNX
Runtime's CPU provider runs), nodes kept in fp32, file size, ONNX Runtime CPU latency (median).
bf16 is judged through its fp32 emulation: ONNX Runtime's CPU provider has no bf16 kernels.

    python precision.py [--iterations 20] [--models bert,llama]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from _anchors import anchor_conversions
from _models import bert_base
from ticknorm import LayerSelection, Precision
from ticknorm.base.inputs import graph_feeds
from ticknorm.base.metrics import compare_arrays
from ticknorm.exporter.export import ExportOptions, export_model, torch_reference
from ticknorm.exporter.model_ref import ModelRef
from ticknorm.exporter.precision.convert import convert
from ticknorm.runtime.ort_runner import OrtRunner
from ticknorm.runtime.registry import RunnerSetup
from ticknorm.validate.compare import compare_runtimes


def llama():
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    return ModelRef(transformers.LlamaForCausalLM(config)).load()


# name -> (build, feeds, exporter): transformers' Llama needs dynamo (aten::diff has no TorchScript translation)
MODELS = {"bert": (bert_base, lambda rng: {"input_ids": rng.integers(0, 30522, (1, 128))}, "torchscript"),
          "llama": (llama, lambda rng: {"input_ids": rng.integers(0, 32000, (1, 64))}, "dynamo")}


def latency_ms(model: onnx.ModelProto, feeds: dict, iterations: int) -> float | None:
    try:
        with OrtRunner(model) as runner:
            runner.infer(feeds)
            times = []
            for _ in range(iterations):
                start = time.perf_counter()
                runner.infer(feeds)
                times.append((time.perf_counter() - start) * 1e3)
    except Exception:  # noqa: BLE001 - a graph ORT CPU cannot run has no latency here
        return None
    return statistics.median(times)


def errors(reference: dict, outputs: dict) -> str:
    checks = [compare_arrays(name, value, np.asarray(outputs[name]).astype(np.float32), 0, 0)
              for name, value in reference.items()]
    return ", ".join(f"{c.name} max {c.max_abs:.2e} mean {c.mean_abs:.2e}" for c in checks)


def worst_module(model: onnx.ModelProto, module, feeds: dict) -> str:
    report = compare_runtimes(model, feeds, ["ort"], RunnerSetup(module), layers=LayerSelection(depth=3))
    rows = [row for row in report.layers if row.comparison is not None]
    worst = max(rows, key=lambda row: row.comparison.max_abs, default=None)
    return f"{worst.module} {worst.comparison.max_abs:.2e}" if worst else "-"


def row(label: str, cells: list) -> None:
    print(f"{label:<34}" + "".join(f"{str(c):<{w}} " for c, w in zip(cells, (9, 9, 7, 62, 34))))


def measure(name: str, iterations: int) -> None:
    build, make_feeds, exporter = MODELS[name]
    module = build().eval()
    feeds = make_feeds(np.random.default_rng(0))
    names, reference = torch_reference(module, feeds)
    reference = dict(zip(names, reference))
    with tempfile.TemporaryDirectory() as workdir:
        path = Path(workdir) / "model.onnx"
        export_model(module, feeds, path, ExportOptions(exporter=exporter, check=False))
        fp32 = onnx.load(str(path))
    runtime_feeds = graph_feeds(fp32, feeds)
    size = lambda m: f"{m.ByteSize() / 2**20:.0f} MB"  # noqa: E731
    print(f"\n{name}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M parameters, input {list(feeds.values())[0].shape}")
    row("", ["latency", "fp32", "size", "error vs PyTorch fp32", "worst module (ORT CPU, depth 3)"])
    with OrtRunner(fp32) as runner:
        outputs = runner.infer(runtime_feeds).outputs
    row("ticknorm fp32", [f"{latency_ms(fp32, runtime_feeds, iterations):.1f} ms", "all", size(fp32),
                          errors(reference, outputs), worst_module(fp32, module, feeds)])
    for dtype in ("fp16", "bf16"):
        start = time.perf_counter()
        conversion = convert(fp32, runtime_feeds, Precision(dtype), reference)
        seconds = time.perf_counter() - start
        low = conversion.model
        latency = latency_ms(low, runtime_feeds, iterations)
        judged = "; ".join(f"max {c.max_abs:.2e} mean {c.mean_abs:.2e} ({'emulated' if 'emulated' in c.name else 'ORT'})"
                           for c in conversion.checks)
        row(f"ticknorm {dtype} ({seconds:.1f} s)",
            [f"{latency:.1f} ms" if latency else "n/a", f"{len(conversion.precision.islands)} nodes", size(low), judged,
             worst_module(low, module, feeds) if latency else "n/a (ORT CPU runs no bf16)"])
        for anchor, result in anchor_conversions(fp32, runtime_feeds, dtype).items():
            if "error" in result:
                row(f"{anchor} {dtype}", ["-", "-", "-", result["error"][:50], ""])
                continue
            anchor_latency = latency_ms(result["model"], runtime_feeds, iterations)
            try:
                with OrtRunner(result["model"]) as runner:
                    got = errors(reference, runner.infer(runtime_feeds).outputs)
            except Exception as exc:  # noqa: BLE001 - the anchor's graph may not run on ORT CPU
                got = f"does not run on ORT CPU: {str(exc).splitlines()[0][:40]}"
            row(f"{anchor} {dtype} ({result['seconds']:.1f} s)",
                [f"{anchor_latency:.1f} ms" if anchor_latency else "n/a", f"{result['kept_fp32']} nodes",
                 size(result["model"]), got, result["note"][:34]])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--models", default="bert,llama")
    args = parser.parse_args()
    for name in args.models.split(","):
        measure(name, args.iterations)
    print(f"\n(python {sys.version.split()[0]}; anchors not installed here show their import error)")


if __name__ == "__main__":
    main()
