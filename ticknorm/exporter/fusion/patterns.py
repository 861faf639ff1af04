"""Recognizers shared by the LayerNorm and RMSNorm matchers.

Exporters spell one computation many ways: a mean is `ReduceMean(keepdims=1)`, or
`ReduceMean(keepdims=0)` then a Reshape, or `ReduceSum / N`; a square is `Pow(t, 2)` or
`Mul(t, t)`; `1/sqrt` is `Div`, `Reciprocal` or `Div(1, .)` then `Mul`. Each recognizer here
accepts every spelling and, when something only looks right, says why it is not.
"""

from dataclasses import dataclass, field

import numpy as np
import onnx

from ticknorm.base.graph import GraphIndex, attr


class NotFused(Exception):
    """A candidate normalization that cannot be fused; the message is the reason for the report."""

    def __init__(self, reason: str, node: str = "", candidate: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.node = node
        # False when the structure stopped looking like a normalization before this point: a
        # mean of squares that divides nothing is not a look-alike worth reporting.
        self.candidate = candidate


@dataclass
class MeanOf:
    """`output` holds the mean of the reduced tensor over `axes`, with the reduced dims kept as size 1."""

    output: str
    axes: tuple
    nodes: list = field(default_factory=list)
    problem: str = ""


def reduce_axes(index: GraphIndex, node: onnx.NodeProto) -> tuple | None:
    """Axes of a Reduce* node from its attribute (old opsets) or its second input (newer ones)."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        if value is None:
            return None
        axes = value.reshape(-1).tolist()
    if axes is None or len(axes) == 0:
        if attr(node, "noop_with_empty_axes", 0):
            return None
        rank = index.rank(node.input[0])
        return None if rank is None else tuple(range(rank))
    return normalize_axes(axes, index.rank(node.input[0]))


def normalize_axes(axes, rank: int | None) -> tuple:
    """Sorted non-negative axes when the rank is known; as written otherwise."""
    if rank is None:
        return tuple(sorted(int(a) for a in axes))
    return tuple(sorted(int(a) % rank for a in axes))


def forward_means(index: GraphIndex, tensor: str) -> list[MeanOf]:
    """Every construction in the graph that averages `tensor` with kept dims."""
    means = []
    for reader in index.consumer_nodes(tensor):
        node = index.nodes[reader]
        if node.op_type not in ("ReduceMean", "ReduceSum") or node.input[0] != tensor:
            continue
        axes = reduce_axes(index, node)
        if axes is None:
            means.append(MeanOf(node.output[0], (), [reader], "the reduction axes are not constant"))
            continue
        means.append(_finish_mean(index, tensor, reader, axes))
    return means


def _finish_mean(index: GraphIndex, tensor: str, reader: int, axes: tuple) -> MeanOf:
    """Follow a reduction through the shape ops that restore its dims (dynamo writes
    Reshape + Expand after a keepdims=0 reduction) and through the division by N of a ReduceSum."""
    node = index.nodes[reader]
    mean = MeanOf(node.output[0], axes, [reader])
    restore = "pending" if not attr(node, "keepdims", 1) else "done"
    divide = node.op_type == "ReduceSum"
    while restore != "done" or divide:
        nxt = index.sole_consumer(mean.output, ignore_shape_readers=True)
        if nxt is None:
            break
        step = index.nodes[nxt]
        if restore != "done" and step.op_type in _SHAPE_OPS and step.input[0] == mean.output:
            restore = _restored(index, tensor, step.output[0], axes)
            if restore is None:
                break
        elif divide and (step.op_type == "Mul" or step.input[0] == mean.output) and step.op_type in ("Div", "Mul"):
            problem = _divisor_check(index, tensor, axes, step, mean.output)
            if problem:
                mean.problem = problem
                return mean
            divide = False
        else:
            mean.problem = _rescale_problem(index, step, mean.output)
            break
        mean.nodes.append(nxt)
        mean.output = step.output[0]
    if mean.problem:
        return mean
    if restore not in ("done", "compatible"):
        mean.problem = "a reduction drops the reduced dims and nothing restores them"
    elif divide:
        mean.problem = "a ReduceSum is not divided by the element count"
    return mean


_SHAPE_OPS = ("Reshape", "Unsqueeze", "Expand")


def _rescale_problem(index: GraphIndex, step: onnx.NodeProto, name: str) -> str:
    """Why a reduction followed by a constant Mul/Div is no mean (dynamo's unbiased variance)."""
    if step.op_type not in ("Mul", "Div"):
        return ""
    factor = index.scalar(_other_input(step, name), beside=name)
    if factor is None:
        return ""
    return f"the reduction is rescaled by {step.op_type} {factor:g} (unbiased N-1 variance is not LayerNorm)"


def _restored(index: GraphIndex, tensor: str, output: str, axes: tuple) -> str | None:
    """'done' when `output` has the source's dims with 1 at `axes`; 'compatible' when some kept
    dims are only known as fresh unknowns (numerical verification backs those); None otherwise."""
    source, restored = index.dims(tensor), index.dims(output)
    if source is None or restored is None or len(source) != len(restored):
        return None
    verdict = "done"
    for axis, (before, after) in enumerate(zip(source, restored)):
        if axis in axes:
            if after != 1:
                return None
        elif after != before:
            if isinstance(after, int) and isinstance(before, int):
                return None
            verdict = "compatible"
    return verdict


def _divisor_check(index: GraphIndex, tensor: str, axes: tuple, step: onnx.NodeProto, total: str) -> str:
    count = _reduced_count(index, tensor, axes)
    divisor = index.scalar(_other_input(step, total), beside=total)
    if divisor is None or count is None:
        return "a ReduceSum is divided by something that is not the element count"
    if step.op_type == "Mul":
        divisor = 1.0 / divisor if divisor else 0.0
    return "" if np.isclose(divisor, count, rtol=1e-6) else _divisor_problem(divisor, count)


def _divisor_problem(divisor: float, count: int) -> str:
    if np.isclose(divisor, count - 1):
        return f"the sum is divided by N-1 = {count - 1} (unbiased variance), not N = {count}"
    return f"the sum is divided by {divisor:g}, not by the element count {count}"


def _reduced_count(index: GraphIndex, tensor: str, axes: tuple) -> int | None:
    dims = index.dims(tensor)
    if dims is None:
        return None
    sizes = [dims[a] for a in axes]
    return int(np.prod(sizes)) if all(isinstance(s, int) for s in sizes) else None


def squares_of(index: GraphIndex, tensor: str) -> list[int]:
    """Nodes computing tensor**2 as `Pow(t, 2)` or `Mul(t, t)`."""
    found = []
    for reader in index.consumer_nodes(tensor):
        node = index.nodes[reader]
        if node.op_type == "Mul" and list(node.input) == [tensor, tensor]:
            found.append(reader)
        elif node.op_type == "Pow" and node.input[0] == tensor and index.scalar(node.input[1], beside=tensor) == 2.0:
            found.append(reader)
    return found


@dataclass
class Tail:
    """`output` = numerator / sqrt(variance + epsilon), for one of the allowed numerators."""

    nodes: list
    epsilon: float
    output: str
    numerator: str


def match_tail(index: GraphIndex, variance: str, numerators: set) -> Tail:
    """From the variance to the normalized tensor; raises NotFused with the reason otherwise."""
    nodes = []
    reader = index.sole_consumer(variance)
    if reader is None:
        raise NotFused(f"the variance '{variance}' is read by more than one node", candidate=False)
    node = index.nodes[reader]
    epsilon = 0.0
    if node.op_type in ("Mul", "Div"):
        factor = index.scalar(_other_input(node, variance), beside=variance)
        amount = f"{factor:g}" if factor is not None else "a computed factor"
        raise NotFused(f"the variance is rescaled by {node.op_type} {amount} before epsilon "
                       "(unbiased N-1 variance is not LayerNorm)", index.node_name(reader))
    if node.op_type == "Add":
        value = index.constant(_other_input(node, variance))
        if value is None:
            raise NotFused("epsilon is not a constant", index.node_name(reader))
        epsilon = index.scalar(_other_input(node, variance), beside=variance)
        if epsilon is None:
            raise NotFused(f"epsilon has shape {list(value.shape)}, not a scalar that keeps the variance's shape",
                           index.node_name(reader))
        nodes.append(reader)
        reader = index.sole_consumer(node.output[0])
        node = index.nodes[reader] if reader is not None else None
    if node is None or node.op_type != "Sqrt":
        found = "several readers" if node is None else node.op_type
        raise NotFused(f"expected Sqrt of variance + epsilon, found {found}", candidate=False)
    nodes.append(reader)
    root = node.output[0]
    if epsilon == 0.0:
        after = index.sole_consumer(root)
        if after is not None and index.nodes[after].op_type == "Add":
            raise NotFused("epsilon is added outside the square root", index.node_name(after))
    return _match_division(index, root, numerators, nodes, epsilon)


def _match_division(index: GraphIndex, root: str, numerators: set, nodes: list, epsilon: float) -> Tail:
    for reader in index.consumer_nodes(root):
        node = index.nodes[reader]
        if node.op_type == "Div" and node.input[1] == root and node.input[0] in numerators:
            return Tail(nodes + [reader], epsilon, node.output[0], node.input[0])
        if _is_inverse(index, node, root):
            inverse, steps = node.output[0], [reader]
            multiply = index.sole_consumer(inverse)
            while multiply is not None and _is_times_one(index, index.nodes[multiply], inverse):
                inverse = index.nodes[multiply].output[0]  # TorchScript writes 1.0 / s as Reciprocal * 1.0
                steps.append(multiply)
                multiply = index.sole_consumer(inverse)
            if multiply is None or index.nodes[multiply].op_type != "Mul":
                continue
            numerator = _other_input(index.nodes[multiply], inverse)
            if numerator in numerators:
                return Tail(nodes + steps + [multiply], epsilon, index.nodes[multiply].output[0], numerator)
    raise NotFused("sqrt(variance + epsilon) does not divide the centered input", index.node_name(nodes[-1]),
                   candidate=False)


def _is_inverse(index: GraphIndex, node: onnx.NodeProto, root: str) -> bool:
    if node.op_type == "Reciprocal":
        return True
    if node.op_type == "Div" and node.input[1] == root:
        return index.scalar(node.input[0], beside=root) == 1.0
    return False


def _is_times_one(index: GraphIndex, node: onnx.NodeProto, name: str) -> bool:
    if node.op_type not in ("Mul", "Div") or (node.op_type == "Div" and node.input[0] != name):
        return False
    return index.scalar(_other_input(node, name), beside=name) == 1.0


def _other_input(node: onnx.NodeProto, name: str) -> str:
    """The operand of a binary node that is not `name` (the first one when both are)."""
    return node.input[1] if node.input[0] == name else node.input[0]


@dataclass
class Affine:
    nodes: list
    output: str
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    cast_back: bool = False


def absorb_affine(index: GraphIndex, start: str, layout: "Layout", allow_bias: bool, cast_to: int | None) -> Affine:
    """Take the per-feature Mul (scale), Add (bias) and the Cast back to the input's dtype that
    follow a normalization, while each is the only reader and its operand is a constant.
    A non-constant or non-per-feature operand stays outside as its own node."""
    affine = Affine([], start)
    while True:
        reader = index.sole_consumer(affine.output)
        if reader is None:
            return affine
        node = index.nodes[reader]
        if node.op_type == "Cast" and cast_to is not None and not affine.cast_back and attr(node, "to") == cast_to:
            affine.cast_back = True
        elif node.op_type == "Mul" and affine.scale is None and affine.bias is None:
            affine.scale = layout.feature_param(index.constant(_other_input(node, affine.output)))
            if affine.scale is None:
                return affine
        elif node.op_type == "Add" and allow_bias and affine.bias is None:
            affine.bias = layout.feature_param(index.constant(_other_input(node, affine.output)))
            if affine.bias is None:
                return affine
        else:
            return affine
        affine.nodes.append(reader)
        affine.output = node.output[0]


@dataclass
class Layout:
    """Where the normalized axes sit in the input, and how to move them to the end if needed."""

    rank: int | None
    axes: tuple
    dims: tuple  # sizes of the normalized axes; None where not static

    @property
    def trailing(self) -> bool:
        if self.rank is None:
            return self.axes == tuple(range(-len(self.axes), 0))
        return self.axes == tuple(range(self.rank - len(self.axes), self.rank))

    @property
    def permutation(self) -> list[int] | None:
        """The Transpose that makes the axes trailing, or None when they already are."""
        if self.trailing:
            return None
        kept = [a for a in range(self.rank) if a not in self.axes]
        return kept + list(self.axes)

    def feature_param(self, value: np.ndarray | None) -> np.ndarray | None:
        """`value` as an array over the normalized dims, or None when it varies along other axes."""
        if value is None or self.rank is None or value.ndim > self.rank:
            return None
        aligned = value.reshape((1,) * (self.rank - value.ndim) + value.shape)
        if any(aligned.shape[a] != 1 for a in range(self.rank) if a not in self.axes):
            return None
        order = [a for a in range(self.rank) if a not in self.axes] + list(self.axes)
        moved = aligned.transpose(order).reshape([aligned.shape[a] for a in self.axes])
        if not all(isinstance(d, int) for d in self.dims):
            return moved if all(s != 1 for s in moved.shape) or moved.size == 0 else None
        if moved.shape == tuple(self.dims):
            return moved
        try:
            return np.broadcast_to(moved, self.dims).copy()
        except ValueError:
            return None  # does not broadcast over the normalized dims: not a scale of this norm

    def static_dims(self, *params) -> tuple | None:
        if all(isinstance(d, int) for d in self.dims):
            return tuple(self.dims)
        shapes = {p.shape for p in params if p is not None}
        return next(iter(shapes)) if len(shapes) == 1 else None


def layout_of(index: GraphIndex, tensor: str, axes: tuple) -> Layout:
    dims = index.dims(tensor)
    rank = None if dims is None else len(dims)
    sizes = tuple(dims[a] if isinstance(dims[a], int) else None for a in axes) if dims else (None,) * len(axes)
    return Layout(rank, axes, sizes)
