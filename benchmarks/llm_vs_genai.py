"""ticknorm's `export --task text-generation-with-past` beside ONNX Runtime GenAI's model builder
(`-p fp32 -e cpu`), both from ONE Llama folder built here from a config (random weights, fp32),
timed alternately in one run on ONNX Runtime CPU, 1 thread: a decode step at past 256 and at past
2048, and a prefill of 128 tokens. Prints the three ratios ticknorm/builder, each file's node count
and fused ops, and each file's max error against PyTorch's logits (a prefill, then a decode step
fed by the file's own cache). Issue 31's table: ticknorm's file is `export --target ort` (the
fused form); `--targets ort plain` times the plain form beside it.

    python benchmarks/llm_vs_genai.py                      # hidden 512, 4 layers (issue 31's model)
    python benchmarks/llm_vs_genai.py --width 8b           # Llama-3-8B width, 2 layers: 3 x 5.6 GB on disk, ~4 min
    python benchmarks/llm_vs_genai.py --width tiny --pasts 16 64 --prefill 8 --rounds 3   # a smoke run

The builder needs a tokenizer in the folder: a word-level one over the vocabulary is written beside
the weights (no download). Without onnxruntime-genai (`pip install .[bench]`) the builder's side
is skipped with a line saying so.
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers

from ticknorm import ExportOptions, Inputs, api
from ticknorm.exporter.attention_target import ATTENTION_TARGETS, ORT

WIDTHS = {
    "table": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=8000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
# What a fused graph is made of: ONNX's own fused ops and ONNX Runtime's (contrib ops, some in ONNX's domain)
FUSED = ("MatMul", "Attention", "RotaryEmbedding", "RMSNormalization", "LayerNormalization",
         "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
         "GroupQueryAttention", "MultiHeadAttention")
BUILDER = "onnxruntime_genai"
ORT_SKIP = "ort-skip"  # --target ort --skip-norms: residual norms as Skip ops, as the builder writes them


def build_folder(folder: Path, width: str) -> transformers.LlamaForCausalLM:
    """The Llama both exporters read: random weights, fp32, and a word-level tokenizer the builder
    insists on loading (nothing here is text: the tokens are random ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**WIDTHS[width], max_position_embeddings=4096, torch_dtype="float32")
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", bos_token="t1",
                                         eos_token="t2").save_pretrained(folder)
    return model


def export_ticknorm(folder: Path, out: Path, form: str) -> Path:
    """`form`: an `export --target`, or `ort-skip` (`--target ort --skip-norms`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    target, skip_norms = (ORT, True) if form == ORT_SKIP else (form, False)
    result = api.export(str(folder), Inputs(("input_ids:batch=2xseq=8:int64",)), out,
                        ExportOptions(task="text-generation-with-past", target=target, skip_norms=skip_norms))
    flags = " --skip-norms" if skip_norms else ""
    print(f"ticknorm export --target {target}{flags}: {time.perf_counter() - started:.1f} s, passed {result.passed}")
    return out


def export_builder(folder: Path, out: Path) -> Path | None:
    """The builder's model.onnx, or None (and why) where it cannot run here."""
    if importlib.util.find_spec(BUILDER) is None:
        print(f"GenAI builder: skipped, {BUILDER} is not installed (pip install onnxruntime-genai==0.18.0)")
        return None
    command = [sys.executable, "-m", f"{BUILDER}.models.builder", "-i", str(folder), "-o", str(out),
               "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "builder_cache")]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"GenAI builder: skipped, it failed (exit {done.returncode}): {last}")
        return None
    print(f"GenAI builder: {time.perf_counter() - started:.1f} s")
    return out / "model.onnx"


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def step_feeds(config, ids: np.ndarray, past: dict[str, np.ndarray] | None = None, past_length: int = 0,
               seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds of one step after a cache: `past` as given, else random of `past_length` (a decode
    step's timing depends on the cache's size, not its values)."""
    batch = ids.shape[0]
    if past is None:
        shape = (batch, config.num_key_value_heads, past_length, config.hidden_size // config.num_attention_heads)
        rng = np.random.default_rng(seed)
        past = {f"past_key_values.{layer}.{kind}": rng.standard_normal(shape).astype(np.float32)
                for layer in range(config.num_hidden_layers) for kind in ("key", "value")}
    length = next(iter(past.values())).shape[2]
    return {"input_ids": ids, "attention_mask": np.ones((batch, length + ids.shape[1]), np.int64), **past}


def histogram(path: Path) -> str:
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    fused = Counter(n.op_type for n in nodes if n.op_type in FUSED or n.domain == "com.microsoft")
    return f"{len(nodes)} nodes (" + ", ".join(f"{count} {op}" for op, count in sorted(fused.items())) + ")"


@dataclass
class Reference:
    """PyTorch's logits on a prefill and on the greedy decode step after it, taken before the
    exports so that the model is freed while they run (at 8B width it is 6 GB)."""

    config: transformers.LlamaConfig
    ids: np.ndarray
    prefill: np.ndarray
    token: np.ndarray
    step: np.ndarray

    @classmethod
    def of(cls, model, prefill: int) -> "Reference":
        ids = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, prefill))
        with torch.no_grad():
            first = model(input_ids=torch.from_numpy(ids), use_cache=True)
            token = first.logits[:, -1:].argmax(-1)
            step = model(input_ids=token, cache=first.cache, use_cache=True).logits
        return cls(model.config, ids, first.logits.numpy(), token.numpy(), step.numpy())

    def max_error(self, runner: ort.InferenceSession) -> float:
        """Worst |logits - PyTorch's| over the prefill and the decode step, the file fed its own cache."""
        names = [o.name for o in runner.get_outputs()]
        outputs = dict(zip(names, runner.run(None, step_feeds(self.config, self.ids, past_length=0))))
        past = {n.replace("present", "past_key_values", 1): v for n, v in outputs.items() if n.startswith("present.")}
        decoded = runner.run(["logits"], step_feeds(self.config, self.token, past))[0]
        return max(float(np.abs(outputs["logits"] - self.prefill).max()), float(np.abs(decoded - self.step).max()))


def time_alternately(files: dict[str, Path], cases: list[tuple[str, dict[str, np.ndarray]]],
                     rounds: int) -> dict[str, dict[str, float]]:
    """Median milliseconds of each file on each case. The runners take turns (their order flips
    each round), so a machine that slows down slows both; and the sessions are made twice, in one
    order and then in the other, half the rounds each: on this machine the session made last ran
    its MatMuls up to 10% faster than the same file's made first, which a fixed order would hand
    to one side."""
    times: dict[str, dict[str, list[float]]] = {label: {name: [] for name in files} for label, _ in cases}
    for order in (list(files), list(files)[::-1]):
        runners = {name: session(files[name]) for name in order}
        for label, feeds in cases:
            for name in order:
                runners[name].run(None, feeds)  # warm-up: first-run allocations are no step's cost
            for turn in range(max(1, rounds // 2)):
                for name in order if turn % 2 == 0 else order[::-1]:
                    started = time.perf_counter()
                    runners[name].run(None, feeds)
                    times[label][name].append((time.perf_counter() - started) * 1000)
        del runners
    return {label: {name: statistics.median(values) for name, values in by_file.items()}
            for label, by_file in times.items()}


def report(reference: Reference, files: dict[str, Path], args) -> None:
    for name, path in files.items():
        print(f"{name}: {histogram(path)}; max |logits - PyTorch| {reference.max_error(session(path)):.2e}")
    config = reference.config
    cases = [(f"decode step, past {past}", step_feeds(config, np.ones((1, 1), np.int64), past_length=past))
             for past in args.pasts]
    prefill = np.random.default_rng(2).integers(0, config.vocab_size, (1, args.prefill))
    cases.append((f"prefill of {args.prefill} tokens", step_feeds(config, prefill, past_length=0)))
    print(f"\nONNX Runtime {ort.__version__} CPU, 1 thread, fp32, median of {args.rounds} alternating runs "
          "(half with the sessions made in each order)")
    for label, medians in time_alternately(files, cases, args.rounds).items():
        line = ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
        ratios = "".join(f"; {name} / builder x{ms / medians['builder']:.2f}" for name, ms in medians.items()
                         if name != "builder" and "builder" in medians)
        print(f"{label}: {line}{ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", choices=list(WIDTHS), default="table")
    parser.add_argument("--pasts", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--targets", nargs="+", choices=(*ATTENTION_TARGETS, ORT_SKIP), default=[ORT],
                        help=f"ticknorm's forms to time (export --target; {ORT_SKIP}: --target ort --skip-norms)")
    parser.add_argument("--workdir", type=Path, help="where the folder and both files go (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as temporary:
        root = args.workdir or Path(temporary)
        model = build_folder(root / "llama", args.width)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"Llama {args.width}: {WIDTHS[args.width]}, {params:.1f}M params")
        reference = Reference.of(model, args.prefill)
        del model
        files = {f"ticknorm {target}": export_ticknorm(root / "llama", root / f"ticknorm-{target}" / "model.onnx",
                                                       target) for target in args.targets}
        built = export_builder(root / "llama", root / "builder")
        if built is not None:
            files["builder"] = built
        report(reference, files, args)


if __name__ == "__main__":
    main()
