"""A Llama-3-8B-shaped folder (32 layers, hidden 4096, 8 KV heads, vocab 128256; bf16 safetensors
shards, random weights, every norm its own) written shard by shard, then exported by `ticknorm
export` (the streamed route: meta-device trace, weights written from the shards, norms fused,
checked block by block against PyTorch), with the time and peak RSS of every phase and the peak as
a multiple of the bf16 weights.

    python benchmarks/streamed_8b.py --folder /tmp/llama8b            # the whole 8B shape (16 GB folder)
    python benchmarks/streamed_8b.py --folder /tmp/l4 --layers 4      # the same widths, 4 layers: a quick look
    python benchmarks/streamed_8b.py --folder /tmp/llama8b --task text-generation-with-past
    python benchmarks/streamed_8b.py --folder /tmp/llama8b --precision bf16

Goal (the real-checkpoints issue): on a 2-core, 24 GiB machine with no GPU, all 65 RMSNorms fused and
verified, peak RSS <= 8 GiB (aim 6), within 30 minutes. Needs about 16 GB of disk for the folder and
32 GB for the fp32 export beside it.
"""

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)


def tensors_of(layers: int, shape: dict):
    """(name, shape, is a norm) in the order a Llama checkpoint stores them."""
    hidden, inner, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"]
    head = hidden // shape["num_attention_heads"]
    yield "model.embed_tokens.weight", (shape["vocab_size"], hidden), False
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        for name, size in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv * head, hidden)),
                           ("self_attn.v_proj", (kv * head, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                           ("mlp.gate_proj", (inner, hidden)), ("mlp.up_proj", (inner, hidden)),
                           ("mlp.down_proj", (hidden, inner))):
            yield f"{prefix}.{name}.weight", size, False
        yield f"{prefix}.input_layernorm.weight", (hidden,), True
        yield f"{prefix}.post_attention_layernorm.weight", (hidden,), True
    yield "model.norm.weight", (hidden,), True
    yield "lm_head.weight", (shape["vocab_size"], hidden), False


def write_folder(folder: Path, layers: int, shard_bytes: int) -> int:
    """The folder as `save_pretrained(max_shard_size=...)` leaves it, one shard in memory at a
    time; returns the bytes of the weights."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, **SHAPE)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    specs = list(tensors_of(layers, SHAPE))
    total = sum(2 * math.prod(size) for _, size, _ in specs)
    count = max(1, math.ceil(total / shard_bytes))
    shard, size, number, weight_map = {}, 0, 1, {}

    def flush():
        nonlocal shard, size, number
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard, size, number = {}, 0, number + 1

    started = time.perf_counter()
    for name, tensor_shape, norm in specs:
        if norm:
            tensor = 1 + 0.1 * torch.randn(tensor_shape, generator=generator)
        else:
            tensor = 0.02 * torch.randn(tensor_shape, generator=generator)
        shard[name] = tensor.to(torch.bfloat16)
        size += 2 * math.prod(tensor_shape)
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {folder}: {total / 2**30:.2f} GiB of bf16 weights in {number - 1} shards, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return total


def timed_export(command: list, weights: int) -> int:
    """Run the export, stamp each progress line it prints with the time and the peak RSS since the
    line before (sampled every 50 ms), and print the table; returns its exit code."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    watched = psutil.Process(process.pid)
    phases, peak, done = [], [0, 0], threading.Event()

    def sample():
        while not done.wait(0.05):
            try:
                rss = sum(p.memory_info().rss for p in [watched, *watched.children(recursive=True)])
            except psutil.Error:
                continue
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], rss)

    threading.Thread(target=sample, daemon=True).start()
    started = time.perf_counter()
    for line in process.stderr:
        now = time.perf_counter() - started
        if phases:
            phases[-1][2] = peak[1]
        peak[1] = 0
        phases.append([now, line.rstrip(), 0])
        print(f"  [{now:7.1f} s] {line.rstrip()}", flush=True)
    output = process.stdout.read()
    code = process.wait()
    done.set()
    end = time.perf_counter() - started
    if phases:
        phases[-1][2] = peak[1]
    print(output)
    print("phase                                                             time     peak RSS")
    for (start, name, phase_peak), following in zip(phases, [*phases[1:], [end]]):
        print(f"  {name[:62]:62s} {following[0] - start:7.1f} s {phase_peak / 2**30:6.2f} GiB")
    print(f"total {end:.0f} s ({end / 60:.1f} min), peak RSS {peak[0] / 2**30:.2f} GiB = "
          f"{peak[0] / weights:.2f}x the bf16 weights ({weights / 2**30:.2f} GiB); exit {code}")
    return code


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--shard-gb", type=float, default=5.0)
    parser.add_argument("--task", default="default")
    parser.add_argument("--streaming", default="on", help="on (the route measured here), auto or off")
    parser.add_argument("--precision", default="fp32", help="fp32 (a 32 GB file at 8B) or bf16 (16 GB)")
    parser.add_argument("--output", type=Path, default=None, help="default: FOLDER.onnx beside the folder")
    args = parser.parse_args()
    if (args.folder / "model.safetensors.index.json").is_file():
        weights = json.loads((args.folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        print(f"using {args.folder} ({weights / 2**30:.2f} GiB of bf16 weights)")
    else:
        weights = write_folder(args.folder, args.layers, int(args.shard_gb * 2**30))
    output = args.output or args.folder.with_suffix(".onnx")
    command = [sys.executable, "-m", "ticknorm.cli", "export", "--model", str(args.folder), "--input",
               "input_ids:batch=1xseq=8:int64:0..128256", "-o", str(output), "--task", args.task,
               "--streaming", args.streaming, "--precision", args.precision]
    sys.exit(timed_export(command, weights))


if __name__ == "__main__":
    main()
