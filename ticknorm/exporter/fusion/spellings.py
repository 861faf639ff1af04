"""The spellings exporters write for the pieces of a normalization, as onnxscript pattern fragments.

A mean is `ReduceMean(keepdims=1)`, or `ReduceMean(keepdims=0)` then the Reshape/Unsqueeze/Expand
that restore the dims (dynamo), or `ReduceSum / N` (`* 1/N`); a square is `Pow(t, 2)` or
`Mul(t, t)`; a variance is also `E[x^2] - E[x]^2`, maybe `Max(., 0)` (Flax/JAX); `1/sqrt` is
`Div`, `Reciprocal` (times 1.0 in TorchScript) or `Div(1, .)`, then `Mul`.
Each fragment is an `OrValue` of its spellings, so the norm rules read as the math they compute.

The fragments are alternatives inside the norm patterns, not canonicalizing rewrites run before
them: a look-alike that is refused must come out of fusion as it went in, and rewriting
`Reciprocal(y) * x` into `Div(x, y)` everywhere would change the numbers of nodes that are no norm.
What a fragment bound is then read back (`mean_of`, `tail_problem`) to check what a pattern cannot
say: that the axes are constant, that N is the element count, that the dims come back.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.pattern import ANY_VALUE, OrValue, Var

from ticknorm.exporter.fusion.norms import NotFused
from ticknorm.exporter.fusion.values import attribute, constant, dims, other_input, producer, rank, scalar

_OPEN = {"_allow_other_inputs": True, "_allow_other_attributes": True}


def _restore(op, value):
    """The dims a keepdims=0 reduction dropped, put back."""
    return OrValue([op.Unsqueeze(value, ANY_VALUE), op.Reshape(value, ANY_VALUE, **_OPEN), op.Expand(value, ANY_VALUE)])


def _per_count(op, value):
    """A sum divided by the element count."""
    return OrValue([op.Div(value, ANY_VALUE), op.Mul(value, ANY_VALUE), op.Mul(ANY_VALUE, value)])


def lifted(op, value):
    """`value`, or `value` Cast: a mixed-precision norm lifts an fp16 tensor into fp32 for the
    part it computes there (`norms.complete_match` checks where each Cast goes)."""
    return OrValue([value, op.Cast(value, _allow_other_attributes=True)])


def mean(op, x, name: str):
    """x averaged over some axes, the reduced dims kept, bound to `name` (read by `mean_of`): a
    reduction (of x, or of x Cast up), the dims it dropped restored, divided by N (a sum), the
    dims restored after, maybe Cast back."""
    # x Cast up spelled per reduction: an OrValue over x itself would not match an x from outside
    # an If/Loop body (onnxscript matches only Vars across graphs)
    reduced = OrValue([reduction(source, **_OPEN) for source in (x, op.Cast(x, _allow_other_attributes=True))
                       for reduction in (op.ReduceMean, op.ReduceSum)])
    kept = OrValue([reduced, _restore(op, reduced), _restore(op, _restore(op, reduced))])
    # scaled twice: dynamo's unbiased variance, a mean times N / (N-1), refused with the reason
    scaled = OrValue([kept, _per_count(op, kept), _per_count(op, _per_count(op, kept))])
    restored = OrValue([scaled, _restore(op, scaled), _restore(op, _restore(op, scaled))])
    return OrValue([restored, op.Cast(restored, _allow_other_attributes=True)], name=name)


def square(op, t):
    """t^2, maybe of t Cast up (a mixed-precision norm squares in fp32); tagged 0 for a Pow."""
    up = op.Cast(t, _allow_other_attributes=True)
    return OrValue([op.Pow(t, Var("two")), op.Mul(t, t), op.Pow(up, Var("two")), op.Mul(up, up)],
                   tag_var="square_by", tag_values=[0, 1, 0, 1])


def squared_mean(op, m):
    """mean(x)^2 in a variance taken as E[x^2] - E[x]^2 (Flax/JAX); tagged apart from `square`,
    which squares x in the same pattern."""
    return OrValue([op.Pow(m, Var("two_m")), op.Mul(m, m)], tag_var="mean_square_by")


def floored(op, variance):
    """E[x^2] - E[x]^2, maybe clamped at 0 (`Max(var, 0)`, Flax) against rounding below zero."""
    return OrValue([variance, op.Max(variance, Var("floor")), op.Max(Var("floor"), variance)])


def root(op, variance):
    """sqrt(variance + epsilon); also the look-alikes refused with a reason (`tail_problem`): the
    variance rescaled before epsilon, epsilon added outside the square root."""
    once = OrValue([op.Mul(variance, Var("factor"), _outputs=["rescaled"]),
                    op.Mul(Var("factor"), variance, _outputs=["rescaled"]),
                    op.Div(variance, Var("factor"), _outputs=["rescaled"])])
    rescaled = OrValue([variance, once, op.Div(once, ANY_VALUE), op.Mul(once, ANY_VALUE)])  # TorchScript: * N / (N-1)
    plus_eps = OrValue([op.Add(rescaled, Var("eps")), op.Add(Var("eps"), rescaled)])
    return OrValue([op.Sqrt(plus_eps), op.Add(op.Sqrt(rescaled), Var("eps_outside")), op.Sqrt(rescaled)],
                   tag_var="epsilon_at", tag_values=["inside", "outside", "none"], name="root")


def inverse(op, value):
    """1 / value, written by exporters as Reciprocal (times 1.0, TorchScript) or Div(1, .), maybe
    Cast back down (TorchScript's fp16 T5 RMSNorm: x * rsqrt(fp32 variance))."""
    one = OrValue([op.Reciprocal(value), op.Div(Var("one"), value)])
    scaled = OrValue([one, op.Mul(one, Var("one_more")), op.Mul(Var("one_more"), one)])
    return OrValue([scaled, op.Cast(scaled, _allow_other_attributes=True)])


def either(op_type: str, op, a, b):
    """a op b or b op a: a commutative node with its operands in either order."""
    return OrValue([getattr(op, op_type)(a, b), getattr(op, op_type)(b, a)])


def folded(op, x, center, root_value, offset_first: bool):
    """x * g + (beta - mean * g) with g = gamma / root (TF/Keras's batch_normalization): the scale
    and bias folded into one factor and one offset; gamma is optional, bound to `gamma` and `beta`.
    The Add's order is the caller's: onnxscript matches no pattern whose output is an `OrValue`."""
    inverted = OrValue([op.Reciprocal(root_value), op.Div(Var("one"), root_value)])
    factor = OrValue([either("Mul", op, inverted, Var("gamma")), inverted])
    terms = [either("Mul", op, x, factor), op.Sub(Var("beta"), either("Mul", op, center, factor))]
    return op.Add(*terms[::-1] if offset_first else terms)


def divided(op, numerator, denominator, spelling: str):
    """numerator / denominator as `Div`, or as `Mul` by its inverse on either side."""
    if spelling == "div":
        return op.Div(numerator, denominator)
    if spelling == "mul":
        return op.Mul(numerator, inverse(op, denominator))
    return op.Mul(inverse(op, denominator), numerator)


DIVISIONS = ("div", "mul", "mul-inverse-first")


def inverse_problem(bindings: dict[str, Any], root_value: ir.Value) -> str:
    """Why the bound `1/x` pieces are no inverse: a divided constant or a factor other than 1."""
    for name in ("one", "one_more"):
        value = bindings.get(name)
        if value is not None and scalar(value, root_value) != 1.0:
            return f"the inverse of the root is scaled by {name}"
    return ""


@dataclass
class Mean:
    """`output` holds the mean of `source` over `axes` with the reduced dims kept, unless `problem`."""

    source: ir.Value
    output: ir.Value
    axes: tuple[int, ...]  # () when they are not constant: `problem` says so
    nodes: list[ir.Node] = field(default_factory=list)
    problem: str = ""
    problem_node: ir.Node | None = None  # where the report points, when not at the norm's first node


def mean_of(output: ir.Value) -> Mean:
    """The mean a `mean` fragment bound, checked from the reduction forward."""
    found = _reduction(output)
    if found is None:  # what a `mean` fragment binds starts at a reduction: this is no such value
        raise NotFused("no reduction computes the mean", output.producer())
    node, source, steps = found
    axes = reduce_axes(node)
    if axes is None:
        return Mean(source, output, (), [node, *steps], "the reduction axes are not constant")
    problem, problem_node = _chain_problem(node, steps, source, axes)
    return Mean(source, output, axes, [node, *steps], problem, problem_node)


_SHAPE_OPS = ("Reshape", "Unsqueeze", "Expand")
_CHAIN_OPS = ("ReduceMean", "ReduceSum", *_SHAPE_OPS, "Div", "Mul", "Cast")
_UNBIASED = "(unbiased N-1 variance is not LayerNorm)"


def _reduction(value: ir.Value | None) -> tuple[ir.Node, ir.Value, list[ir.Node]] | None:
    """The reduction that computes `value` through the steps a mean takes, its input, and those
    steps from the reduction on; None when no such chain computes `value` (`mean_of` and `reduces`
    walk it alike)."""
    steps: list[ir.Node] = []
    node = producer(value)
    while node is not None and node.op_type in _CHAIN_OPS:
        if node.op_type in ("ReduceMean", "ReduceSum"):
            source = node.inputs[0]
            return None if source is None else (node, source, steps[::-1])
        steps.append(node)
        node = producer(_chained(node))
    return None


def _chained(step: ir.Node) -> ir.Value | None:
    """The input of a step after a reduction that carries the reduced values (not N, not a shape)."""
    if step.op_type in (*_SHAPE_OPS, "Cast"):
        return step.inputs[0]
    first, second = step.inputs[:2]
    before = producer(first)
    return first if before is not None and before.op_type in _CHAIN_OPS else second


def _chain_problem(reduce: ir.Node, steps: list[ir.Node], source: ir.Value,
                   axes: tuple[int, ...]) -> tuple[str, ir.Node | None]:
    """Follow a reduction through the shape ops that restore its dims and the division by N of a
    ReduceSum; why it is no mean ('' when it is), and the node to point at if not the first."""
    restore: str | None = "done" if attribute(reduce, "keepdims", 1) else "pending"
    divide = reduce.op_type == "ReduceSum"
    current = reduce.outputs[0]
    for step in steps:
        if step.op_type == "Cast":
            pass  # a mean Cast back: where it goes is the match's to check
        elif step.op_type in _SHAPE_OPS:
            restore = _restored(source, step.outputs[0], axes)
            if restore is None:
                break
        elif divide:
            problem = _divisor_problem(source, axes, step, current)
            if problem:
                return problem, None
            divide = False
        else:
            factor = scalar(other_input(step, current), beside=current)
            amount = f"{factor:g}" if factor is not None else "a computed factor"
            if restore == "done":  # a mean already, then rescaled: TorchScript's unbiased variance
                return f"the variance is rescaled by {step.op_type} {amount} before epsilon {_UNBIASED}", step
            return f"the reduction is rescaled by {step.op_type} {amount} {_UNBIASED}", None
        current = step.outputs[0]
    if restore not in ("done", "compatible"):
        return "a reduction drops the reduced dims and nothing restores them", None
    return ("a ReduceSum is not divided by the element count" if divide else ""), None


def reduces(value: ir.Value | None, source: ir.Value | None) -> bool:
    """Whether `value` is computed by a reduction of `source` through the steps a mean takes."""
    found = _reduction(value)
    return found is not None and source is not None and source in (found[1], uncast(found[1]))


def uncast(value: ir.Value | None) -> ir.Value | None:
    """What a Cast turned into `value`; `value` itself when no Cast computes it."""
    node = producer(value)
    return node.inputs[0] if node is not None and node.op_type == "Cast" else value


def reduce_axes(node: ir.Node) -> tuple[int, ...] | None:
    """Axes of a Reduce* node from its attribute (old opsets) or its second input (newer ones)."""
    axes = attribute(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        value = constant(node.inputs[1])
        if value is None:
            return None
        axes = value.reshape(-1).tolist()
    size = rank(node.inputs[0])
    if axes is None or len(axes) == 0:
        if attribute(node, "noop_with_empty_axes", 0):
            return None
        return None if size is None else tuple(range(size))
    if size is None:
        return tuple(sorted(int(a) for a in axes))
    return tuple(sorted(int(a) % size for a in axes))


def _restored(source: ir.Value, output: ir.Value, axes: tuple[int, ...]) -> str | None:
    """'done' when `output` has the source's dims with 1 at `axes`; 'compatible' when some kept
    dims are only known as fresh unknowns (numerical verification backs those); None otherwise."""
    before_dims, after_dims = dims(source), dims(output)
    if before_dims is None or after_dims is None or len(before_dims) != len(after_dims):
        return None
    verdict = "done"
    for axis, (before, after) in enumerate(zip(before_dims, after_dims)):
        if axis in axes:
            if after != 1:
                return None
        elif after != before:
            if isinstance(after, int) and isinstance(before, int):
                return None
            verdict = "compatible"
    return verdict


def _divisor_problem(source: ir.Value, axes: tuple[int, ...], step: ir.Node, total: ir.Value) -> str:
    count = _reduced_count(source, axes)
    divisor = scalar(other_input(step, total), beside=total)
    if step.op_type == "Div" and step.inputs[0] is not total:
        divisor = None  # N / sum is no mean
    if divisor is None or count is None:
        return "a ReduceSum is divided by something that is not the element count"
    if step.op_type == "Mul":
        divisor = 1.0 / divisor if divisor else 0.0
    if np.isclose(divisor, count, rtol=1e-6):
        return ""
    if np.isclose(divisor, count - 1):
        return f"the sum is divided by N-1 = {count - 1} (unbiased variance), not N = {count}"
    return f"the sum is divided by {divisor:g}, not by the element count {count}"


def _reduced_count(source: ir.Value, axes: tuple[int, ...]) -> int | None:
    sizes = dims(source)
    if sizes is None:
        return None
    static = [size for size in (sizes[a] for a in axes) if isinstance(size, int)]
    return int(np.prod(static)) if len(static) == len(axes) else None


def tail_problem(bindings: dict[str, Any], variance: ir.Value) -> tuple[str, ir.Node | None]:
    """Why sqrt(variance + epsilon) as bound is no norm's, and at which node; ('', None) if it is."""
    top = bindings["root"].producer()
    if bindings.get("rescaled") is not None:
        node = bindings["rescaled"].producer()
        factor = scalar(bindings["factor"], beside=variance)
        amount = f"{factor:g}" if factor is not None else "a computed factor"
        return f"the variance is rescaled by {node.op_type} {amount} before epsilon {_UNBIASED}", node
    if bindings["epsilon_at"] == "outside":
        return "epsilon is added outside the square root", top
    if bindings["epsilon_at"] == "none":
        return "", None
    eps, add = bindings["eps"], top.inputs[0].producer()
    value = constant(eps)
    if value is None:
        return "epsilon is not a constant", add
    if scalar(eps, beside=variance) is None:
        return f"epsilon has shape {list(value.shape)}, not a scalar that keeps the variance's shape", add
    return "", None


def epsilon(bindings: dict[str, Any], variance: ir.Value) -> float:
    """The epsilon of a tail that `tail_problem` passed."""
    if bindings["epsilon_at"] == "none":
        return 0.0
    value = scalar(bindings["eps"], beside=variance)
    if value is None:  # refused by `tail_problem` before
        raise NotFused("epsilon is not a scalar constant")
    return value


def square_problem(bindings: dict[str, Any], base: ir.Value, tag: str = "square_by", two: str = "two") -> bool:
    """True when a bound Pow raises to something other than 2."""
    return bindings.get(tag) == 0 and scalar(bindings[two], beside=base) != 2.0


def moments_problem(bindings: dict[str, Any], base: ir.Value) -> str:
    """Why E[x^2] - E[x]^2 as bound (`squared_mean`, `floored`) is no variance ('' when it is)."""
    if square_problem(bindings, base, "mean_square_by", "two_m"):
        return "the mean is raised to a power other than 2"
    floor = bindings.get("floor")
    if floor is not None and scalar(floor, beside=base) != 0.0:
        return "the variance is clamped at something other than 0"
    return ""
