"""Error metrics between a reference array and another, with NaN/Inf placement checked first."""

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ticknorm.base.errors import AccuracyError, InputSpecError

# |actual - reference| <= atol + rtol*|reference|, by the dtype the reference is computed in: the
# default of every comparison ticknorm makes (fusion, export, convert, compare, drift). Float math
# is reordered by every runtime, so even fp32 is not bit-exact. The low types' bars are what a
# whole deep model's rounding adds up to: a BERT-base-sized encoder with every value rounded to
# the type (benchmarks/precision.py) ends 0.033 from fp32 in fp16 (1 of 98k values past 1e-2) and
# 0.23 in bf16 (1 past 0.1); bf16 keeps 8 mantissa bits to fp16's 11.
DTYPE_TOLERANCES = {"float32": (1e-4, 1e-3), "float64": (1e-8, 1e-7), "float16": (2e-2, 2e-2), "bfloat16": (2e-1, 2e-1)}


# How a value passes. ticknorm: |error| <= atol + rtol*|ref| (numpy's allclose). polygraphy: Polygraphy's
# own check, its SimpleCompareFunc (what the deprecated CompareFunc.simple makes) with the elementwise
# statistic `polygraphy run` checks by default, the reference second as `--load-outputs` places it, on the
# values in float64 as ticknorm's report computes them: a value fails only when
# |error| > atol and |error|/|ref| > rtol both hold, so the same bundle gets the verdict Polygraphy gives it.
# Polygraphy allows max(atol, rtol*|ref|) where ticknorm allows their sum: the rules part only inside
# that band, widest at |ref| = atol/rtol. A zero reference is atol in both, bar Polygraphy's epsilon (it
# divides by 2.2e-16): at atol 0 it passes an error up to rtol*2.2e-16, ticknorm none. NaN and Inf are
# placed first in both modes (the same places pass) and the rule judges the finite values: Polygraphy's
# own check fails every NaN, even one the reference has too.
CHECK_RULES = ("ticknorm", "polygraphy")


def passes(reference: np.ndarray, actual: np.ndarray, atol: float, rtol: float, rule: str = "ticknorm") -> bool:
    """Whether every value of `actual` is close enough to `reference`, by `rule`."""
    with np.errstate(invalid="ignore"):  # Inf - Inf is a NaN error, which fails: no warning on the way
        if rule == "polygraphy":
            return polygraphy_passes(reference, actual, atol, rtol)
        return bool(np.all(np.abs(actual - reference) <= atol + rtol * np.abs(reference)))


def polygraphy_passes(reference: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> bool:
    """Polygraphy's verdict (see CHECK_RULES); its log, a block per comparison, is held back: the
    verdict is reported in ticknorm's own lines."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc

    from ticknorm.base.run_results import polygraphy_quiet

    check = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise")
    with polygraphy_quiet():
        found = check(IterationResult({"value": actual}, runner_name="actual"),
                      IterationResult({"value": reference}, runner_name="reference"))
    return bool(found["value"])


def dtype_tolerance(dtype) -> tuple[float, float]:
    """(atol, rtol) for a tensor of `dtype`; exact for integers and booleans."""
    return DTYPE_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))


@dataclass
class Tolerance:
    """What the user asked for; None takes the tolerance of the type a run computes in, so an fp16
    run is judged at fp16's bar in every command."""

    atol: float | None = None
    rtol: float | None = None
    per_output: dict[str, tuple[float, float]] = field(default_factory=dict)  # (atol, rtol) by output name
    rule: str = "ticknorm"  # see CHECK_RULES

    def __post_init__(self):
        if self.rule not in CHECK_RULES:
            raise InputSpecError(f"unknown check mode '{self.rule}'; choose one of: {', '.join(CHECK_RULES)}")

    def at(self, type_name: str = "float32") -> "ResolvedTolerance":
        """Every number filled in, for a run computing in `type_name` (float32, float16, bfloat16)."""
        atol, rtol = DTYPE_TOLERANCES[type_name]
        return ResolvedTolerance(atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol,
                                 self.per_output, self.rule)


@dataclass(frozen=True)
class ResolvedTolerance:
    """A `Tolerance` with every number filled in (`Tolerance.at`): what a comparison is judged at."""

    atol: float
    rtol: float
    per_output: dict[str, tuple[float, float]]
    rule: str

    def of(self, name: str) -> tuple[float, float, str]:
        """(atol, rtol, rule) for one output: `compare_arrays`'s last three."""
        return (*self.per_output.get(name, (self.atol, self.rtol)), self.rule)


@dataclass
class ArrayComparison:
    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    passed: bool
    reason: str = ""
    atol: float | None = None  # the tolerance it was judged at
    rtol: float | None = None

    def line(self) -> str:
        verdict = ("ok" + (f" ({self.reason})" if self.reason else "")) if self.passed else f"FAIL ({self.reason})"
        return (f"{self.name}: max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g}, "
                f"mean abs {self.mean_abs:.3g}, cosine {self.cosine:.6f}  {verdict}")


def compare_arrays(name: str, reference: np.ndarray, actual: np.ndarray, atol: float, rtol: float,
                   rule: str = "ticknorm") -> ArrayComparison:
    """Pass when every value is within tolerance by `rule` (see CHECK_RULES) and NaN/Inf sit in the
    same places; non-float arrays must be equal."""
    reference, actual = _widen(np.asarray(reference)), _widen(np.asarray(actual))
    if reference.shape != actual.shape:
        return _failed(name, f"shape {actual.shape} instead of {reference.shape}")
    if reference.dtype.kind not in "fc" or actual.dtype.kind not in "fc":
        equal = np.array_equal(reference, actual)
        return ArrayComparison(name, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"), 0.0,
                               1.0, equal, "" if equal else "values differ")
    ref, out = reference.astype(np.float64), actual.astype(np.float64)
    if not np.array_equal(np.isnan(ref), np.isnan(out)):
        return _failed(name, f"NaN in {int(np.isnan(out).sum())} places, reference has {int(np.isnan(ref).sum())}")
    infinite = np.isinf(ref) | np.isinf(out)
    if not np.array_equal(ref[infinite], out[infinite]):
        return _failed(name, "Inf in different places")
    finite = np.isfinite(ref) & np.isfinite(out)
    ref, out = ref[finite], out[finite]
    error = np.abs(ref - out)
    if error.size == 0:
        return ArrayComparison(name, 0.0, 0.0, 0.0, 1.0, True, "", atol, rtol)
    max_abs = float(error.max())
    max_rel = float((error / np.maximum(np.abs(ref), np.finfo(np.float64).tiny)).max())
    norms = np.linalg.norm(ref) * np.linalg.norm(out)
    cosine = float(np.dot(ref, out) / norms) if norms > 0 else float(np.array_equal(ref, out))
    passed = passes(ref, out, atol, rtol, rule)
    if rule == "polygraphy":
        reason = (f"max |error| {max_abs:.3g} where |error| > atol {atol:g} and |error|/|ref| > rtol {rtol:g} "
                  "(Polygraphy's rule)")
    else:
        reason = f"max |error| {max_abs:.3g} > atol {atol:g} + rtol {rtol:g}*|ref|"
    reason = "" if passed else reason
    return ArrayComparison(name, max_abs, max_rel, float(error.mean()), cosine, passed, reason, atol, rtol)


def within_own_rounding(found: ArrayComparison, own: np.ndarray, upcast: np.ndarray, actual: np.ndarray,
                        type_name: str) -> ArrayComparison:
    """A graph judged against a bf16/fp16 checkpoint's PyTorch (`own`) that missed that type's bar
    is still right where every value is no farther from it than the same model's exact fp32 upcast
    (`upcast`) is, plus fp32's bar: the difference is then the type's own rounding on this model,
    which a deep model accumulates past the type's default bar (a 32-layer, 8B-wide Llama's logits:
    0.35 in bf16), not the graph's."""
    own, upcast, actual = (_widen(np.asarray(a)).astype(np.float64) for a in (own, upcast, actual))
    if found.passed or own.shape != actual.shape or own.shape != upcast.shape or not np.isfinite(found.max_abs):
        return found
    atol, rtol = DTYPE_TOLERANCES["float32"]
    rounding = np.abs(upcast - own)
    if not np.all(np.abs(actual - own) <= rounding + atol + rtol * np.abs(upcast)):
        return found
    return dataclasses.replace(found, passed=True, reason=f"{type_name}'s own rounding: PyTorch's fp32 upcast is "
                                                          f"{float(rounding.max()):.3g} from it too")


def as_close_as_the_checkpoint(found: ArrayComparison, own: np.ndarray, upcast: np.ndarray,
                               type_name: str) -> ArrayComparison:
    """A low-precision graph judged against the exact fp32 model (`upcast`) that missed its type's
    bar is still right where its largest error is no larger than that of the checkpoint's own
    PyTorch run in that type (`own`): it is then as close to the model as the model the user
    serves in that type is. `found` compares the graph with `upcast`."""
    own, upcast = (_widen(np.asarray(a)).astype(np.float64) for a in (own, upcast))
    if found.passed or own.shape != upcast.shape or not np.isfinite(found.max_abs):
        return found
    spread = float(np.abs(own - upcast).max()) if own.size else 0.0
    if found.max_abs > spread:
        return found
    return dataclasses.replace(found, passed=True, reason=f"no farther than PyTorch in {type_name}, the checkpoint's "
                                                          f"type, is from the fp32 model: {spread:.3g}")


def _widen(array: np.ndarray) -> np.ndarray:
    """bfloat16 (an ml_dtypes type numpy files under kind 'V') compares as the float it is."""
    return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def ensure_finite(outputs: dict[str, np.ndarray], what: str) -> None:
    """A reference with NaN or Inf cannot judge anything: stop with the output's name."""
    for name, value in outputs.items():
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            raise AccuracyError(f"{what} output '{name}' holds NaN or Inf on these inputs; it cannot serve as a "
                                "reference")


def _failed(name: str, reason: str) -> ArrayComparison:
    return ArrayComparison(name, float("inf"), float("inf"), float("inf"), float("nan"), False, reason)
