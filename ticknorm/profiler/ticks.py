"""Ticks, spans and the log that aggregates them into per-module statistics.

A tick is a timestamp with its clock: `host` (time.perf_counter_ns), `cuda` (a CUDA event, read
after the iteration), or `runtime` (ORT's profiler or TensorRT's IProfiler reported the duration).
Spans from different clocks are never mixed in one number without saying so: each TickLog has one.
"""

import statistics
from dataclasses import dataclass, field

UNATTRIBUTED = "(unattributed)"
ROOT = "(root)"  # ops the top-level module runs itself, outside any submodule


@dataclass(frozen=True)
class Tick:
    clock: str  # host | cuda | runtime
    ns: int


@dataclass(frozen=True)
class Span:
    layer: str  # the runtime's own name for what ran (module path, ORT node, TensorRT layer)
    modules: tuple[str, ...]  # the PyTorch modules it covers; () when it maps to none
    iteration: int
    begin: Tick
    end: Tick

    @property
    def duration_ns(self) -> int:
        return self.end.ns - self.begin.ns


# A row whose middle 80 % of iterations spread wider than half its median is no figure to take a
# ratio of: the table says so instead of printing one.
SPREAD_LIMIT = 0.5


@dataclass
class ModuleTiming:
    module: str
    median_ms: float
    p90_ms: float
    min_ms: float
    samples: int
    p10_ms: float = 0.0

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: how far apart the iterations were."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def unstable(self) -> bool:
        return self.spread > SPREAD_LIMIT


# Plain and instrumented iterations alternate in blocks of this many, each block after one untimed
# run of its kind: a plain run never follows an instrumented one (whose caches and pools it would
# inherit), and a change in machine load between blocks still hits both kinds alike.
BLOCK = 5


def blocks(iterations: int) -> list[range]:
    """The timed iterations, in the blocks they run in."""
    return [range(start, min(start + BLOCK, iterations)) for start in range(0, iterations, BLOCK)]


def roll_up(module: str, depth: int | None) -> str:
    if depth is None or not module:
        return module
    return ".".join(module.split(".")[:depth])


@dataclass
class TickLog:
    runtime: str
    clock: str
    spans: list[Span] = field(default_factory=list)
    end_to_end_ns: list[int] = field(default_factory=list)  # measured without instrumentation
    instrumented_ns: list[int] = field(default_factory=list)  # the same iterations with instrumentation
    iterations: int = 0
    device_ns: list[int] = field(default_factory=list)  # GPU compute per plain iteration, copies excluded (TensorRT)
    source: str = ""  # where the figures came from when not measured here (trtexec files)

    def row_key(self, span: Span, depth: int | None) -> str:
        """A span covering several modules (a fused TensorRT layer) becomes one group row."""
        modules = sorted({roll_up(m, depth) or ROOT for m in span.modules})
        if not modules:
            return UNATTRIBUTED
        return modules[0] if len(modules) == 1 else " + ".join(modules)

    def per_module(self, depth: int | None = None) -> dict[str, ModuleTiming]:
        totals: dict[str, list[int]] = {}
        for span in self.spans:
            per_iteration = totals.setdefault(self.row_key(span, depth), [0] * self.iterations)
            per_iteration[span.iteration] += span.duration_ns
        return {key: timing(key, values) for key, values in totals.items()}

    @property
    def end_to_end_ms(self) -> float:
        return statistics.median(self.end_to_end_ns) / 1e6 if self.end_to_end_ns else float("nan")

    @property
    def device_ms(self) -> float:
        return statistics.median(self.device_ns) / 1e6 if self.device_ns else float("nan")

    @property
    def overhead(self) -> float:
        """Instrumented / uninstrumented end-to-end time, minus one: the median over blocks of each
        block's ratio of medians. A plain block and the instrumented block beside it ran seconds
        apart, so a machine whose speed drifts over minutes changes both alike."""
        if not self.end_to_end_ns or not self.instrumented_ns:
            return float("nan")
        pairs = [(self.instrumented_ns[i:i + BLOCK], self.end_to_end_ns[i:i + BLOCK])
                 for i in range(0, min(len(self.instrumented_ns), len(self.end_to_end_ns)), BLOCK)]
        return statistics.median(statistics.median(hooked) / statistics.median(plain) for hooked, plain in pairs) - 1.0

    def coverage(self) -> float:
        """Time attributed to modules / end-to-end time of the same instrumented run, the median
        over runs: one run stalled outside the model (a pause of the interpreter, a pool waking)
        is no unattributed model time. (Against the uninstrumented time it can pass 100%:
        profilers inflate what they time.)"""
        attributed = [0] * len(self.instrumented_ns)
        for span in self.spans:
            if span.modules and 0 <= span.iteration < len(attributed):
                attributed[span.iteration] += span.duration_ns
        shares = [done / total for done, total in zip(attributed, self.instrumented_ns) if total]
        return statistics.median(shares) if shares else float("nan")


def timing(key: str, values_ns: list[int]) -> ModuleTiming:
    values = sorted(v / 1e6 for v in values_ns)

    def quantile(q: float) -> float:
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]

    return ModuleTiming(key, statistics.median(values), quantile(0.9), values[0], len(values), quantile(0.1))
