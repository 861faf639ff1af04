"""The profiler's CUDA-event clock on `torch-cuda`, beside host timing: the BERT-base-sized encoder
profiled per module (CUDA events recorded by the module hooks, read once per iteration), and the
same model's plain forward timed alone twice, by the host clock (perf_counter around the forward
and a synchronize) and by CUDA events around the forward. Whether the GPU profile is to be trusted
on a GPU host: targets coverage (module time / instrumented run) >= 95 %, the profile's
uninstrumented end to end within 10 % of the plain forward's host time, and the host time over the
CUDA-event time of the plain forward saying how launch-bound the model is at this size.

    python benchmarks/profile_torch_cuda.py [--batch 1] [--seq 128] [--iterations 30] [--depth 2] [--json out.json]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from _models import bert_base
from ticknorm.base.atomic import write_text
from ticknorm.exporter.export import ExportOptions, export_model
from ticknorm.profiler.profile import Timing, profile_runtimes
from ticknorm.report.profile_outputs import table, to_dict
from ticknorm.runtime.registry import RunnerSetup


def plain_forward_ms(module, input_ids: np.ndarray, iterations: int) -> dict:
    """Median ms of a no_grad forward on the GPU: host clock (the forward, then a synchronize) and
    CUDA events around the forward, in alternate iterations so both see the same machine."""
    model = module.cuda()
    ids = torch.from_numpy(input_ids).cuda()
    host, events = [], []
    with torch.no_grad():
        for _ in range(5):
            model(ids)
        torch.cuda.synchronize()
        for _ in range(iterations):
            start = time.perf_counter_ns()
            model(ids)
            torch.cuda.synchronize()
            host.append((time.perf_counter_ns() - start) / 1e6)
            began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began.record()
            model(ids)
            ended.record()
            ended.synchronize()
            events.append(began.elapsed_time(ended))
    return {"host_ms": statistics.median(host), "cuda_event_ms": statistics.median(events)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: this benchmark profiles torch-cuda and needs a CUDA GPU")
    module = bert_base()
    input_ids = np.random.default_rng(0).integers(0, 30522, (args.batch, args.seq))
    feeds = {"input_ids": input_ids}
    with tempfile.TemporaryDirectory() as workdir:  # the graph gives the profile its module order
        path = Path(workdir) / "bert.onnx"
        export_model(module, feeds, path, ExportOptions(exporter="torchscript", check=False))
        model = onnx.load(str(path))
    result = profile_runtimes(model, feeds, ("torch-cuda",), RunnerSetup(module), Timing(args.iterations, 5, args.depth))
    log = result.logs["torch-cuda"]
    plain = plain_forward_ms(module, input_ids, args.iterations)
    figures = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
               "iterations": args.iterations, "plain": plain,
               "profile_end_to_end_over_plain_host": log.end_to_end_ms / plain["host_ms"],
               "plain_host_over_cuda_events": plain["host_ms"] / plain["cuda_event_ms"],
               "profile": to_dict(result)}
    print(f"BERT-base-sized encoder, batch {args.batch}, seq {args.seq}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, depth {args.depth}, {args.iterations} iterations")
    print(table(result))
    print(f"plain forward alone: host clock {plain['host_ms']:.3f} ms, CUDA events {plain['cuda_event_ms']:.3f} ms "
          f"(host / events x{figures['plain_host_over_cuda_events']:.2f}: above 1, launches or the sync cost time)")
    print(f"profile's uninstrumented end to end / plain host x{figures['profile_end_to_end_over_plain_host']:.3f} "
          f"(target within 10 %); coverage {log.coverage():.1%} (target >= 95 %); overhead {log.overhead:+.1%}")
    if args.json_path:
        write_text(args.json_path, json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
