"""ticknorm's export of a BERT-base-shaped folder beside Optimum's `optimum-cli export onnx --optimize O2`
of the same folder, timed alternately in one run on ONNX Runtime CPU, 1 thread, fp32. Issue 31 part
4: "Encoders stay at least as fast"; the goal is every ratio ticknorm/optimized <= 1. It measures;
it changes nothing in ticknorm.

    python benchmarks/bert_vs_ort_optimizer.py                 # BERT-base: 12 layers, ~2 min
    python benchmarks/bert_vs_ort_optimizer.py --layers 2 --rounds 5    # a smoke run

The folder: `BertModel(BertConfig())` (hidden 768, 12 layers unless `--layers`, 12 heads,
intermediate 3072, vocab 30522; random weights, seed 0, built from the config, nothing downloaded),
written with `save_pretrained`.

File A: `ticknorm.api.export` of the folder, as `ticknorm export --model FOLDER --target ort
--input ...` runs it: the default exporter, fp32, each self-attention as ONNX Runtime's `Attention`,
each residual Add + LayerNorm over token rows (kept from ONNX Runtime's scalar SkipLayerNormalization
kernel; `--skip-norms` writes that op instead, as B has it), checked against PyTorch; inputs
`input_ids`, `attention_mask` and `token_type_ids`, batch and sequence dynamic. `--target plain`
times the plain form instead.

File B: what `optimum-cli export onnx --model FOLDER --task feature-extraction --optimize O2` writes.
Optimum is not installed here (optimum 2.3.0 and optimum-onnx have no common release pip can
resolve), so B is made the way Optimum makes it:
1. `torch.onnx.export(..., dynamo=False)` (TorchScript), opset 17, inputs `input_ids`,
   `attention_mask`, `token_type_ids` and output `last_hidden_state`, axes 0 and 1 dynamic as
   `batch_size` and `sequence_length` (Optimum's names; its feature-extraction task has no
   `pooler_output`, which A keeps: one 768x768 product on one token per sequence), the model
   set to transformers' eager attention first (`--attention eager`, the default): ORT's
   optimizer fuses that form into `Attention` (one per layer); the SDPA form transformers uses by
   default (`--attention sdpa`) is left unfused by it (0 Attention: its Softmax/MatMuls stay);
2. `onnxruntime.transformers.optimizer.optimize_model(B, model_type="bert", num_heads=12,
   hidden_size=768, opt_level=2, use_gpu=False, optimization_options=FusionOptions("bert"))`, the
   options being O2's: ORT's graph level 2 (extended) first, then the transformers fusions with
   their defaults (attention, skip/bias-skip LayerNorm, Gelu, BiasGelu) and Gelu approximation
   off (O3 turns it on), and EmbedLayerNormalization fusion off, as Optimum's `OptimizationConfig`
   has it by default (`disable_embed_layer_norm_fusion=True`).
"""

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

from ticknorm import ExportOptions, Inputs, api
from ticknorm.exporter.attention_target import ATTENTION_TARGETS, ORT

sys.path.insert(0, str(Path(__file__).parent))
from llm_vs_genai import session, time_alternately  # noqa: E402  (1-thread ORT CPU sessions taking turns, as the LLM table's)

NAMES = ("input_ids", "attention_mask", "token_type_ids")
SHOWN = ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization", "Attention",
         "MultiHeadAttention", "FastGelu", "Gelu", "BiasGelu", "Erf", "MatMul", "Gemm", "Softmax")


def build_folder(folder: Path, layers: int) -> transformers.BertModel:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(num_hidden_layers=layers)).eval()
    model.save_pretrained(folder)
    return model


def export_ticknorm(folder: Path, out: Path, target: str, skip_norms: bool) -> Path:
    specs = ("input_ids:batch=1xseq=128:int64:0..30522", "attention_mask:batch=1xseq=128:int64:1..2",
             "token_type_ids:batch=1xseq=128:int64:0..2")
    started = time.perf_counter()
    result = api.export(str(folder), Inputs(specs), out, ExportOptions(target=target, skip_norms=skip_norms))
    flags = " --skip-norms" if skip_norms else ""
    print(f"A, ticknorm export --target {target}{flags}: {time.perf_counter() - started:.1f} s, passed {result.passed}")
    return out


def export_optimized(model: transformers.BertModel, out: Path, attention: str) -> Path:
    """File B, as the module's docstring says: Optimum's plain export, then ORT's optimizer at O2."""
    model.set_attn_implementation(attention)
    plain = out.with_name("plain.onnx")
    feeds = tuple(torch.from_numpy(array) for array in bert_feeds(1, 16, model.config.vocab_size).values())
    axes = {name: {0: "batch_size", 1: "sequence_length"} for name in (*NAMES, "last_hidden_state")}
    started = time.perf_counter()
    torch.onnx.export(_LastHidden(model).eval(), feeds, str(plain), input_names=list(NAMES),
                      output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    options = FusionOptions("bert")
    options.enable_embed_layer_norm = False
    options.enable_gelu_approximation = False
    config = model.config
    optimized = optimize_model(str(plain), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=2, use_gpu=False,
                               optimization_options=options)
    optimized.save_model_to_file(str(out))
    model.set_attn_implementation("sdpa")  # PyTorch's reference runs as transformers' default
    print(f"B, torch.onnx.export ({attention} attention) + optimize_model O2: {time.perf_counter() - started:.1f} s")
    return out


class _LastHidden(torch.nn.Module):
    """Optimum's feature-extraction outputs: the last hidden state alone."""

    def __init__(self, model: transformers.BertModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def bert_feeds(batch: int, length: int, vocab: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, vocab, (batch, length)),
            "attention_mask": np.ones((batch, length), np.int64),
            "token_type_ids": rng.integers(0, 2, (batch, length))}


def histogram(path: Path) -> str:
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    ops = Counter(n.op_type for n in nodes if n.op_type in SHOWN or n.domain == "com.microsoft")
    return f"{len(nodes)} nodes (" + ", ".join(f"{count} {op}" for op, count in sorted(ops.items())) + ")"


def max_error(runner: ort.InferenceSession, feeds: dict[str, np.ndarray], expected: np.ndarray) -> float:
    wanted = {i.name for i in runner.get_inputs()}
    got = runner.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in wanted})[0]
    return float(np.abs(got - expected).max())


def report(model: transformers.BertModel, files: dict[str, Path], args) -> None:
    for name, path in files.items():
        print(f"{name}: {histogram(path)}")
    print(f"\nONNX Runtime {ort.__version__} CPU, 1 thread, fp32, median of {args.rounds} alternating runs "
          "(half with the sessions made in each order)")
    cases, errors = [], {}
    for batch, length in args.shapes:
        feeds = bert_feeds(batch, length, model.config.vocab_size)
        with torch.no_grad():
            expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        label = f"batch {batch} x seq {length}"
        errors[label] = ", ".join(f"{name} {max_error(session(path), feeds, expected):.2e}"
                                  for name, path in files.items())
        cases.append((label, feeds))
    for label, medians in time_alternately(files, cases, args.rounds).items():
        line = ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
        ratio = medians["ticknorm"] / medians["optimized"]
        print(f"{label}: {line} = ticknorm / optimized x{ratio:.3f}; max |last_hidden_state - PyTorch|: "
              f"{errors[label]}")


def shape(text: str) -> tuple[int, int]:
    batch, length = text.split("x")
    return int(batch), int(length)


def run(args: argparse.Namespace, root: Path) -> None:
    model = build_folder(root / "bert", args.layers)
    print(f"BERT, {args.layers} layers: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    (root / "optimized").mkdir(parents=True, exist_ok=True)
    files = {"ticknorm": export_ticknorm(root / "bert", root / "ticknorm" / "model.onnx", args.target, args.skip_norms),
             "optimized": export_optimized(model, root / "optimized" / "model.onnx", args.attention)}
    report(model, files, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="where the folder and both files go (default: a temporary one)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--shapes", type=shape, nargs="+", default=[(1, 128), (8, 32)], help="BATCHxSEQ")
    parser.add_argument("--attention", choices=("eager", "sdpa"), default="eager",
                        help="the attention B is exported with (ORT's optimizer fuses only eager's into Attention)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--target", choices=ATTENTION_TARGETS, default=ORT, help="A's form (export --target)")
    parser.add_argument("--skip-norms", action="store_true", help="A's residual norms as SkipLayerNormalization")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as temporary:
        run(args, args.workdir or Path(temporary))


if __name__ == "__main__":
    main()
