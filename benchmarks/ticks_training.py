"""What recording ticks costs a fine-tuning loop: a BERT-base-sized encoder (25 hand-written
LayerNorms, all recorded) with a classification head, trained by plain AdamW on CPU, batch 1 x
seq 32, a tick every 50 steps. Goal: under 1 % averaged over the run.

Two copies of the model train side by side in one process, one plain, one with a Recorder that
stays open for its whole run (as it would in a real one): blocks of 5 steps alternate between
them in the order plain, recorded, recorded, plain, ... so a machine that speeds up or slows down
hits both alike. Printed: each loop's mean step and their ratio, and the tick steps against the
plain steps run at the same point of the run. Then the tick alone, many times: forward + backward
with a tick armed against the same without, alternating, on the recorded model.

    python ticks_training.py [--steps 200] [--every 50] [--threads N]

On a shared machine give `--threads 1`: a two-thread step whose second core is taken waits on it
and swings by several times, which no alternation cancels.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from _models import PowSqrtDiv, bert_base
from ticknorm.ticks import Recorder, read_ticks

SEQUENCE, VOCAB, BLOCK = 32, 30522, 5


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = bert_base().train()
        self.head = nn.Linear(768, 2)

    def forward(self, input_ids):
        return self.head(self.encoder(input_ids)[:, 0])


class Loop:
    """One model, its optimizer and its batches; `recorder.step()` after each step when recorded."""

    def __init__(self, batches):
        torch.manual_seed(0)
        self.model = Classifier()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.batches, self.done, self.times = batches, 0, []
        self.recorder = None

    def loss(self):
        input_ids, label = self.batches[self.done % len(self.batches)]
        return nn.functional.cross_entropy(self.model(input_ids), label)

    def steps(self, count: int, timed: bool = True) -> None:
        for _ in range(count):
            start = time.perf_counter()
            self.loss().backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            if self.recorder is not None:
                self.recorder.step()
            if timed:
                self.times.append(time.perf_counter() - start)
            self.done += 1


def tick_alone(loop: Loop, pairs: int) -> tuple[float, float]:
    """Median forward + backward (no optimizer step) with a tick armed, and without, alternating
    (the run's last step armed the first)."""
    plain, ticked = [], []
    for _ in range(pairs):
        for armed, times in ((True, ticked), (False, plain)):
            if armed:
                loop.recorder.tick()
            start = time.perf_counter()
            loop.loss().backward()
            times.append(time.perf_counter() - start)
            loop.optimizer.zero_grad()
    return statistics.median(ticked), statistics.median(plain)


def main(steps: int, every: int, threads: int | None, pairs: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, VOCAB, (1, SEQUENCE), generator=generator), torch.randint(0, 2, (1,), generator=generator))
               for _ in range(16)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ticks.jsonl"
        plain, recorded = Loop(batches), Loop(batches)
        for loop in (plain, recorded):
            loop.steps(3, timed=False)  # warm-up: allocator, optimizer state
        recorded.recorder = Recorder(recorded.model, path, every=every, modules=(PowSqrtDiv,))
        with recorded.recorder:  # armed: the recorded loop's first timed step is a tick (its step 0)
            for block in range(2 * steps // BLOCK):
                (recorded if block % 4 in (1, 2) else plain).steps(BLOCK)
                if block % (2 * every // BLOCK) == 2 * every // BLOCK - 1:
                    print(f"{len(plain.times)} + {len(recorded.times)} steps: mean step plain {statistics.mean(plain.times) * 1e3:.1f} "
                          f"ms, recorded {statistics.mean(recorded.times) * 1e3:.1f} ms", flush=True)
            ticked, untouched = tick_alone(recorded, pairs)
        records = read_ticks(path)
    ticks = sorted({record["step"] for record in records})
    plain_mean, recorded_mean = statistics.mean(plain.times), statistics.mean(recorded.times)
    tick_indices = range(0, len(recorded.times), every)
    tick_cost = statistics.mean(recorded.times[i] - plain.times[i] for i in tick_indices)
    between = [t for i, t in enumerate(recorded.times) if i % every]
    print(f"\nBERT-base-sized encoder + head ({sum(p.numel() for p in plain.model.parameters()) / 1e6:.1f}M params), "
          f"batch 1 x seq {SEQUENCE}, AdamW, {torch.get_num_threads()} thread(s); {len(plain.times)} plain and "
          f"{len(recorded.times)} recorded steps in alternating blocks of {BLOCK}, a tick every {every} "
          f"(ticks at steps {ticks[:-1]}, + {ticks[-1]} measured alone; {len(records)} lines)")
    print(f"mean step: plain {plain_mean * 1e3:.1f} ms, recorded {recorded_mean * 1e3:.1f} ms: ratio "
          f"x{recorded_mean / plain_mean:.4f} ({(recorded_mean / plain_mean - 1) * 100:+.2f} %); medians "
          f"{statistics.median(plain.times) * 1e3:.1f} / {statistics.median(recorded.times) * 1e3:.1f} ms")
    print(f"recorded steps between ticks (no hook attached): mean {statistics.mean(between) * 1e3:.1f} ms")
    print(f"tick steps in the run: {tick_cost * 1e3:+.1f} ms each against the plain step at the same point "
          f"({tick_cost / (every * plain_mean) * 100:+.2f} % of {every} plain steps)")
    alone = ticked - untouched
    print(f"the tick alone, {pairs} alternating pairs of forward + backward: {ticked * 1e3:.1f} ms with a tick, "
          f"{untouched * 1e3:.1f} ms without (medians): {alone * 1e3:+.1f} ms per tick = "
          f"{alone / (every * plain_mean) * 100:+.3f} % of a run with a tick every {every} steps")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="Steps of each loop (whole blocks of 10).")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--pairs", type=int, default=20, help="Pairs of forward + backward timing the tick alone.")
    arguments = parser.parse_args()
    main(arguments.steps, arguments.every, arguments.threads, arguments.pairs)
