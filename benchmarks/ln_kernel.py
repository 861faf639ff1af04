"""ticknorm's Triton LayerNorm vs `F.layer_norm` vs a device-to-device copy of the same bytes, on a
CUDA GPU: 16384 rows, hidden in {768, 1024, 1000, 2041, 4096, 8192}, fp16 and bf16.

Each timing is one launch between two CUDA events with L2 flushed before it (a 256 MiB write), the
median of `--iterations`. Bytes moved = 2 * rows * hidden * element size (read x, write y; the
weight and bias are one row). Goals: >= 90% of the copy's bandwidth at hidden >= 4096, >= 75% at
768/1024, >= 1.3x F.layer_norm at 768/1024, never slower than F.layer_norm at any listed shape.

    python benchmarks/ln_kernel.py [--iterations 100] [--json out.json] [--plot out.png]
    python benchmarks/ln_kernel.py --sweep   # also time every (rows per program, warps) choice
    python benchmarks/ln_kernel.py --hidden 768,1024,4096,8192 --sweep --sweep-hidden 1024,4096  # the GPU checklist's

`--device cpu` runs the same script through Triton's interpreter (TRITON_INTERPRET=1) with a
wall clock: its timings mean nothing, it is how CI checks that the script itself works.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from ticknorm.plugins import layer_norm
from ticknorm.plugins.launch import LaunchConfig, launch_config, next_power_of_two

HIDDEN = (768, 1024, 1000, 2041, 4096, 8192)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Timer:
    """Median milliseconds of single launches, each after an L2 flush: CUDA events on a GPU, the
    wall clock on the CPU (the interpreter's smoke run)."""

    def __init__(self, iterations: int, device: str):
        self.iterations = iterations
        self.device = device
        self.flush = torch.empty(256 << 20 if device == "cuda" else 1 << 20, dtype=torch.uint8, device=device)

    def __call__(self, fn) -> float:
        fn()  # compile / warm up
        times = []
        for _ in range(self.iterations):
            self.flush.zero_()
            times.append(self._cuda_ms(fn) if self.device == "cuda" else self._wall_ms(fn))
        return statistics.median(times)

    @staticmethod
    def _cuda_ms(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    @staticmethod
    def _wall_ms(fn) -> float:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3


def _inputs(rows: int, hidden: int, dtype, device: str):
    generator = torch.Generator(device=device).manual_seed(hidden)
    x = torch.randn(rows, hidden, device=device, generator=generator).mul_(2).add_(3).to(dtype)
    weight = torch.randn(hidden, device=device, generator=generator).to(dtype)
    bias = torch.randn(hidden, device=device, generator=generator).to(dtype)
    return x, weight, bias


def _max_error(out, x, weight, bias) -> float:
    reference = F.layer_norm(x.double(), (x.shape[-1],), weight.double(), bias.double(), 1e-5)
    return (out.double() - reference).abs().max().item()


def measure(timer: Timer, rows: int, hidden: int, dtype) -> dict:
    x, weight, bias = _inputs(rows, hidden, dtype, timer.device)
    copy_out = torch.empty_like(x)
    moved = 2 * x.numel() * x.element_size()
    ms = {"ours": timer(lambda: layer_norm(x, weight, bias, 1e-5)),
          "torch": timer(lambda: F.layer_norm(x, (hidden,), weight, bias, 1e-5)),
          "copy": timer(lambda: copy_out.copy_(x))}
    tbps = {name: moved / (t * 1e-3) / 1e12 for name, t in ms.items()}
    return {"hidden": hidden, "ms": ms, "tbps": tbps, "of_copy": tbps["ours"] / tbps["copy"],
            "torch_of_copy": tbps["torch"] / tbps["copy"], "speedup": ms["torch"] / ms["ours"],
            "err_ours": _max_error(layer_norm(x, weight, bias, 1e-5), x, weight, bias),
            "err_torch": _max_error(F.layer_norm(x, (hidden,), weight, bias, 1e-5), x, weight, bias)}


def goals(row: dict) -> list[str]:
    """The goals this row misses."""
    missed = []
    hidden = row["hidden"]
    if hidden >= 4096 and row["of_copy"] < 0.90:
        missed.append("<90% copy BW")
    if hidden in (768, 1024):
        if row["of_copy"] < 0.75:
            missed.append("<75% copy BW")
        if row["speedup"] < 1.3:
            missed.append("<1.3x torch")
    if row["speedup"] < 1.0:
        missed.append("slower than torch")
    return missed


def sweep(timer: Timer, rows: int, hidden: int, dtype) -> list[dict]:
    """Every (rows per program, warps) up to 16K elements per program, fastest first."""
    x, weight, bias = _inputs(rows, hidden, dtype, timer.device)
    block = next_power_of_two(hidden)
    results = []
    for per_program in (1, 2, 4, 8, 16):
        if per_program > 1 and per_program * block > 16384:
            continue
        for warps in (1, 2, 4, 8, 16, 32):
            if warps * 32 > per_program * block:  # threads with nothing to hold
                continue
            config = LaunchConfig(block, per_program, warps, 0)
            results.append({"rows": per_program, "warps": warps,
                            "ms": timer(lambda: layer_norm(x, weight, bias, 1e-5, config))})
    return sorted(results, key=lambda r: r["ms"])


def plot(results: list, path: str, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 4))
    labels = [f"{r['dtype']}\n{r['hidden']}" for r in results]
    positions = range(len(results))
    axes.bar([p - 0.2 for p in positions], [r["of_copy"] * 100 for r in results], 0.4, label="ticknorm (Triton)")
    axes.bar([p + 0.2 for p in positions], [r["torch_of_copy"] * 100 for r in results], 0.4, label="F.layer_norm")
    axes.axhline(90, color="grey", linestyle=":", linewidth=1)
    axes.set_xticks(list(positions), labels)
    axes.set_ylabel("% of D2D copy bandwidth")
    axes.set_title(f"LayerNorm, {results[0]['rows']} rows, {device_name}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--hidden", default=",".join(map(str, HIDDEN)))
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--sweep", action="store_true",
                        help="Also time every launch configuration for the first dtype (slow: compiles each).")
    parser.add_argument("--sweep-hidden", default=None,
                        help="The hidden sizes --sweep tries (default: every --hidden): a shorter run on a lent GPU.")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run through Triton's interpreter; its timings mean nothing.")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--plot", dest="plot_path")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: this benchmark needs a CUDA GPU (--device cpu is a smoke run of the script only)")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is first imported
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, Triton interpreter (timings meaningless)"
    timer = Timer(args.iterations, args.device)
    hidden_sizes = [int(h) for h in args.hidden.split(",")]
    print(f"{device_name}, torch {torch.__version__}, {args.rows} rows, median of {args.iterations}")
    print(f"{'dtype':<5} {'hidden':>6} {'ours us':>8} {'torch us':>8} {'copy us':>8} {'ours TB/s':>9} "
          f"{'of copy':>7} {'torch of copy':>13} {'x torch':>7} {'err ours':>9} {'err torch':>9}  goals")
    results, sweeps = [], []
    for dtype_name in args.dtypes.split(","):
        for hidden in hidden_sizes:
            row = {"dtype": dtype_name, "rows": args.rows, **measure(timer, args.rows, hidden, DTYPES[dtype_name])}
            missed = row["missed"] = goals(row)
            results.append(row)
            print(f"{dtype_name:<5} {hidden:>6} {row['ms']['ours'] * 1e3:>8.1f} {row['ms']['torch'] * 1e3:>8.1f} "
                  f"{row['ms']['copy'] * 1e3:>8.1f} {row['tbps']['ours']:>9.2f} {row['of_copy']:>7.1%} "
                  f"{row['torch_of_copy']:>13.1%} {row['speedup']:>6.2f}x {row['err_ours']:>9.2e} "
                  f"{row['err_torch']:>9.2e}  {', '.join(missed) or 'met'}", flush=True)
    if args.sweep:
        dtype_name = args.dtypes.split(",")[0]
        for hidden in [int(h) for h in args.sweep_hidden.split(",")] if args.sweep_hidden else hidden_sizes:
            found = sweep(timer, args.rows, hidden, DTYPES[dtype_name])
            chosen = launch_config(args.rows, hidden)
            current = next(r for r in found if (r["rows"], r["warps"]) == (chosen.rows, chosen.num_warps))
            best = found[0]
            sweeps.append({"dtype": dtype_name, "hidden": hidden, "results": found})
            print(f"sweep {dtype_name} {hidden}: best rows={best['rows']} warps={best['warps']} "
                  f"{best['ms'] * 1e3:.1f} us; current rows={chosen.rows} warps={chosen.num_warps} "
                  f"{current['ms'] * 1e3:.1f} us (x{current['ms'] / best['ms']:.2f}); next: "
                  + ", ".join(f"{r['rows']}/{r['warps']}:{r['ms'] * 1e3:.1f}" for r in found[1:5]), flush=True)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"device": device_name, "rows": args.rows, "results": results,
                       "sweeps": sweeps}, handle, indent=2)
    if args.plot_path:
        plot(results, args.plot_path, device_name)
    missed = sum(bool(r["missed"]) for r in results)
    print(f"goals met at {len(results) - missed} of {len(results)} shapes")


if __name__ == "__main__":
    main()
