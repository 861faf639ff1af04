"""Ticks per module over the training steps: how large each norm's values grew, whether they
approach fp16's largest number (past `1/headroom` of it) and from which step they pass it. What
`ticks show` prints, what a calibration adds fp32 islands from, what a golden bundle keeps."""

import json
import math
import warnings
from dataclasses import dataclass

from ticknorm.base.errors import TicknormWarning, TicksError
from ticknorm.base.precision import LARGEST
from ticknorm.base.text_table import render

DEFAULT_HEADROOM = 4.0
# The recorded values a low type's range limits, and how a reason names them.
LIMITED = {"input_absmax": "input", "output_absmax": "output", "input_meansq_max": "input mean of squares"}


@dataclass(frozen=True)
class ModuleRange:
    module: str
    ticks: tuple[dict, ...]  # the module's records, in step order

    @property
    def steps(self) -> list[int]:
        return [tick["step"] for tick in self.ticks]

    def values(self, key: str) -> list:
        return [tick.get(key) for tick in self.ticks]

    @property
    def absmax(self) -> list[float]:
        """Per tick, the larger of the input's and the output's largest magnitude."""
        return [max(_number(tick.get("input_absmax")), _number(tick.get("output_absmax"))) for tick in self.ticks]

    def peak(self, key: str) -> float:
        return max(_number(value) for value in self.values(key))

    def first_past(self, key: str, limit: float) -> int | None:
        """The first step whose `key` value exceeds `limit` (NaN and inf count: no low type holds them)."""
        return next((tick["step"] for tick in self.ticks if _number(tick.get(key)) > limit), None)

    def first_absmax_past(self, limit: float) -> int | None:
        return next((step for step, value in zip(self.steps, self.absmax) if value > limit), None)

    def overflow(self, dtype: str) -> tuple[str, int, float] | None:
        """(what, first step, peak) of the first recorded value past `dtype`'s largest number."""
        found = [(step, key) for key in LIMITED if (step := self.first_past(key, LARGEST[dtype])) is not None]
        if not found:
            return None
        step, key = min(found)
        return LIMITED[key], step, self.peak(key)

    def stored(self) -> dict:
        """The peaks a golden bundle keeps beside its own statistics."""
        return {"ticks": len(self.ticks), "steps": [self.steps[0], self.steps[-1]],
                **{key: self.peak(key) for key in LIMITED}}


def module_ranges(records: list[dict]) -> list[ModuleRange]:
    """One ModuleRange per module, in the order the model first ran them."""
    by_module: dict[str, list[dict]] = {}
    for record in records:
        by_module.setdefault(record["module"], []).append(record)
    return [ModuleRange(module, tuple(sorted(ticks, key=lambda t: t["step"]))) for module, ticks in by_module.items()]


def present_ranges(ranges: list[ModuleRange], present, source: str, example: str) -> list[ModuleRange]:
    """The recorded modules the model has (`present(module)`): a file none of whose modules it
    has is refused, the ones it lacks are named in a warning."""
    found = [r for r in ranges if present(r.module)]
    missing = [r.module or "(root)" for r in ranges if not present(r.module)]
    if not found:
        raise TicksError(f"--calibration {source}: none of its {len(ranges)} modules is in this model (it recorded "
                         f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; this model's modules look "
                         f"like '{example}'): was it recorded on another model?")
    if missing:
        warnings.warn(f"--calibration {source}: {len(missing)} recorded module(s) are not in this model and are not "
                      f"used: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}", TicknormWarning,
                      stacklevel=2)
    return found


@dataclass
class TickSummary:
    source: str
    modules: list[ModuleRange]  # in model order
    headroom: float = DEFAULT_HEADROOM

    @property
    def near_limit(self) -> float:
        return LARGEST["fp16"] / self.headroom

    def text(self) -> str:
        rows = []
        for found in self.modules:
            absmax = found.absmax
            overflow = found.overflow("fp16")
            near_step = found.first_absmax_past(self.near_limit)
            rows.append([found.module or "(root)", str(len(found.ticks)), f"{found.steps[0]}-{found.steps[-1]}",
                         *map(_cell, (absmax[0], absmax[-1], max(absmax), found.peak("input_meansq_max"))),
                         "" if near_step is None else str(near_step),
                         "" if overflow is None else f"{overflow[1]} ({overflow[0]})"])
        steps = sorted({step for found in self.modules for step in found.steps})
        lines = [f"{self.source}: {len(self.modules)} modules, {len(steps)} ticks (steps {steps[0]}-{steps[-1]})",
                 render(["module", "ticks", "steps", "absmax first", "last", "peak", "input mean sq peak",
                         f"> fp16/{self.headroom:g} from step", "> fp16 max from step"], rows, 1)]
        near = [found for found in self.modules if found.first_absmax_past(self.near_limit) is not None]
        past = [found for found in self.modules if found.overflow("fp16") is not None]
        lines.append(f"{len(near)} module(s) approach fp16 overflow (absmax > {self.near_limit:.6g} = fp16 max / "
                     f"{self.headroom:g})" + (f", first {_first(near, lambda m: m.first_absmax_past(self.near_limit))}"
                                             if near else ""))
        advice = (f", first {_first(past, lambda m: m.overflow('fp16')[1])}; export with --precision fp16 "
                  f"--calibration {self.source} to keep them in fp32") if past else ""
        lines.append(f"{len(past)} module(s) pass fp16's max {LARGEST['fp16']:g}{advice}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        modules = []
        for found in self.modules:
            overflow = found.overflow("fp16")
            modules.append({"module": found.module, "steps": found.steps, "absmax": found.absmax,
                            "input_meansq_max": found.values("input_meansq_max"), "peak_absmax": max(found.absmax),
                            "near_overflow_step": found.first_absmax_past(self.near_limit),
                            "overflow": None if overflow is None else dict(zip(("what", "step", "peak"), overflow))})
        return {"source": self.source, "headroom": self.headroom, "near_limit": self.near_limit,
                "fp16_max": LARGEST["fp16"], "modules": modules}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def summarize_ticks(records: list[dict], source: str = "ticks", headroom: float = DEFAULT_HEADROOM) -> TickSummary:
    if headroom < 1:
        raise TicksError(f"headroom {headroom:g}: it divides fp16's max and must be 1 or more")
    return TickSummary(source, module_ranges(records), headroom)


def _first(modules: list[ModuleRange], step_of) -> str:
    first = min(modules, key=step_of)
    return f"{first.module or '(root)'} at step {step_of(first)}"


def _cell(value: float) -> str:
    return "-" if value == -math.inf else f"{value:.4g}"  # -inf: not recorded


def _number(value) -> float:
    """A recorded value as a comparable float: a missing one is -inf, NaN is +inf (past any range)."""
    if value is None:
        return -math.inf
    return math.inf if math.isnan(value) else float(value)
