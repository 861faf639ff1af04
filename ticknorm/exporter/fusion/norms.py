"""What a matched normalization is, its forward tail (scale, bias, the Cast back out of an fp32
island), and the checks every match must pass before it is fused."""

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ticknorm.base.scopes import SCOPE_KEY, common_scope
from ticknorm.exporter.fusion.values import (NodeNames, attribute, constant, elem_type, escapes, other_input, producer,
                                             readers, sole_reader)
from ticknorm.exporter.fusion.values import dims as dims_of

_LOW_PRECISION = (int(ir.DataType.FLOAT16), int(ir.DataType.BFLOAT16))
_INDEX_TYPES = (int(ir.DataType.INT64), int(ir.DataType.INT32))


class NotFused(Exception):
    """A candidate normalization that cannot be fused; the message is the reason for the report."""

    def __init__(self, reason: str, node: ir.Node | None = None, nodes=()):
        super().__init__(reason)
        self.reason = reason
        self.node = node
        self.nodes = list(nodes)  # what the rule matched: no look-alike is reported twice


@dataclass
class Layout:
    """Where the normalized axes sit in the input, and how to move them to the end if needed."""

    rank: int | None
    axes: tuple[int, ...]
    dims: tuple[int | None, ...]  # sizes of the normalized axes; None where not static
    symbols: tuple[int | str | None, ...] = ()  # the same, symbolic names kept: what a fed scale must have

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
        if self.rank is None:  # `complete_match` refuses these first
            raise NotFused(f"the rank is unknown, so axes {list(self.axes)} cannot be moved last")
        kept = [a for a in range(self.rank) if a not in self.axes]
        return kept + list(self.axes)

    def feature_param(self, value: np.ndarray | None) -> np.ndarray | None:
        """`value` as an array over the normalized dims, or None when it varies along other axes."""
        if value is not None and self.rank is None:
            return self._unranked_param(value)
        if value is None or self.rank is None or value.ndim > self.rank:
            return None
        aligned = value.reshape((1,) * (self.rank - value.ndim) + value.shape)
        if any(aligned.shape[a] != 1 for a in range(self.rank) if a not in self.axes):
            return None
        order = [a for a in range(self.rank) if a not in self.axes] + list(self.axes)
        moved = aligned.transpose(order).reshape([aligned.shape[a] for a in self.axes])
        known = self.known_dims
        if known is None:
            return moved if all(s != 1 for s in moved.shape) or moved.size == 0 else None
        if moved.shape == known:
            return moved
        try:
            return np.broadcast_to(moved, known).copy()
        except ValueError:
            return None  # does not broadcast over the normalized dims: not a scale of this norm

    def _unranked_param(self, value: np.ndarray) -> np.ndarray | None:
        """With the input's rank unknown, a parameter over trailing axes only, none of its dims
        broadcast (Paddle2ONNX's plain length-C scale): its leading 1s dropped down to those axes."""
        shape = value.shape
        while len(shape) > len(self.axes) and shape[0] == 1:
            shape = shape[1:]
        if not self.trailing or len(shape) != len(self.axes) or 1 in shape:
            return None
        return value.reshape(shape)

    def fits_fed(self, value: ir.Value) -> bool:
        """Whether a graph input's declared dims are the normalized ones (symbols included), so that
        the fused node can read it as its scale or bias."""
        return self.trailing and None not in self.symbols and dims_of(value) == self.symbols

    @property
    def known_dims(self) -> tuple[int, ...] | None:
        """`dims` when every one is static."""
        static = tuple(d for d in self.dims if isinstance(d, int))
        return static if len(static) == len(self.dims) else None

    def static_dims(self, *params: "Param") -> tuple[int, ...] | None:
        """The normalized dims: static ones, else the one shape that the scale and bias share."""
        if self.known_dims is not None:
            return self.known_dims
        shapes = {p.shape for p in params if isinstance(p, np.ndarray)}
        return next(iter(shapes)) if len(shapes) == 1 else None


def layout_of(source: ir.Value, axes: tuple[int, ...]) -> Layout:
    """Where the normalized `axes` of `source` sit. Where ONNX's inference left its rank or one of
    those dims unknown, ONNX Runtime's symbolic shape inference is asked (`values.dims`)."""
    sizes = dims_of(source)
    if sizes is None or any(sizes[a] is None for a in axes if -len(sizes) <= a < len(sizes)):
        sizes = dims_of(source, deep=True)
    rank = None if sizes is None else len(sizes)
    axes = axes if rank is None else tuple(sorted(a % rank for a in axes))
    picked = tuple(sizes[a] for a in axes) if sizes else (None,) * len(axes)
    return Layout(rank, axes, tuple(size if isinstance(size, int) else None for size in picked), picked)


@dataclass
class NormMatch:
    """A normalization ready to be replaced by one node."""

    kind: str  # "LayerNorm" or "RMSNorm"
    nodes: list[ir.Node]  # what it replaces
    input: ir.Value
    output: str  # the name of `output_value`
    layout: Layout
    dims: tuple[int, ...] | None  # the normalized dims, static: the shape of the scale and bias built (None: unknown)
    epsilon: float
    scale: "Param"
    bias: "Param"
    elem_type: int
    scope: str
    anchor: str  # name of the first original node, for the report
    output_value: ir.Value
    notes: list[str] = field(default_factory=list)


@dataclass
class NormRefusal:
    """Something that looks like a normalization and is not fused, with the reason."""

    kind: str
    reason: str
    node: str
    scope: str


Finding = NormMatch | NormRefusal  # what fusion makes of something that looks like a normalization
# A norm's scale or bias: a per-feature constant over the normalized dims, a graph input the
# fused node reads itself, or none.
Param = np.ndarray | ir.Value | None


def scope_of(node: ir.Node) -> str | None:
    return node.metadata_props.get(SCOPE_KEY)


def refusal(kind: str, error: NotFused, names: NodeNames) -> NormRefusal:
    node = error.node
    if node is None:  # refused before the match's nodes were known: nowhere to point
        return NormRefusal(kind, error.reason, "", "")
    return NormRefusal(kind, error.reason, names.get(node, node.name or node.op_type), scope_of(node) or "")


@dataclass
class _Affine:
    nodes: list[ir.Node]
    output: ir.Value
    scale: Param = None
    bias: Param = None
    cast_back: bool = False


def complete_match(kind: str, source: ir.Value, layout: Layout, front: list[ir.Node], normalized: ir.Value,
                   epsilon: float, names: NodeNames, fed: bool = True) -> NormMatch:
    """Add the affine part and the dtype casts, then check that the rewrite is safe. `fed`: a
    scale or bias fed as a graph input may be taken (not where the rule composes them itself)."""
    if layout.rank is None and not layout.trailing:
        raise NotFused(f"the rank of '{source.name}' is unknown, so axes {list(layout.axes)} cannot be checked")
    _check_fusable(layout, epsilon)
    lifts = names.in_graph_order(_lifts(front, source))
    cast_node, cast_source = _input_cast(source)
    cast_to = elem_type(cast_source) if cast_node is not None or lifts else None
    affine = _absorb_affine(normalized, layout, kind == "LayerNorm", cast_to, fed)
    members = set(front) | set(affine.nodes)
    if cast_node is not None and affine.cast_back and all(r in members for r in readers(source)):
        members.add(cast_node)
    nodes = names.in_graph_order(_with_plumbing(members))
    dims = layout.static_dims(affine.scale, affine.bias)
    if dims is None:
        _check_dynamic_scale(source, affine, kind)
    _check_private(nodes, affine.output, kind, names)
    fused_input = cast_source if affine.cast_back else source
    fused_type, output = elem_type(fused_input, deep=True), affine.output
    if not fused_type:  # unknown, or UNDEFINED: the rewrite could not type the scale and bias
        raise NotFused(f"the element type of '{fused_input.name}' is unknown, so scale and bias cannot be built")
    if output.name is None:
        raise NotFused("the normalized output has no name, so verification cannot check it")
    _check_output_type(fused_input, output)
    notes = []
    if layout.permutation is not None:
        notes.append(f"axes {list(layout.axes)} moved last with Transpose {layout.permutation}")
    if lifts:
        notes.append(f"Casts inside absorbed ({', '.join(names[n] for n in lifts)}): the {_type_name(fused_type)} "
                     "norm computed in fp32 via stash_type=1, as those Casts had it")
    if affine.cast_back:
        notes.append("Cast pair absorbed: computed in fp32 via stash_type=1")
    scope = common_scope(scope_of(n) or "" for n in nodes)
    return NormMatch(kind, nodes, fused_input, output.name, layout, dims, epsilon, affine.scale, affine.bias,
                     fused_type, scope, names[nodes[0]], output, notes)


def _check_dynamic_scale(source: ir.Value, affine: _Affine, kind: str) -> None:
    """With the normalized dims unknown, a scale of ones is built from the input's shape
    (`rewrite`: Shape(start=-k), ConstantOfShape), which takes opset 15, below the 17 every
    LayerNormalization gets; a fed scale is read as it is."""
    if any(isinstance(p, np.ndarray) for p in (affine.scale, affine.bias)):
        raise NotFused(f"the normalized dims of '{source.name}' are not static and the scale and bias do not "
                       "share one shape, so they cannot be built")
    opset = None if source.graph is None else source.graph.opset_imports.get("")
    if kind == "RMSNorm" and affine.scale is None and opset is not None and opset < 15:
        raise NotFused(f"the normalized dims of '{source.name}' are not static, and opset {opset} has no "
                       "Shape(start) to build the scale of ones from (fuse with --opset 15 or above)")


def _check_fusable(layout: Layout, epsilon: float) -> None:
    """What no run needs to show. The fused op's epsilon is a float attribute: one that float32
    cannot hold is no longer the norm's (1e-50 becomes 0.0: NaN on an all-zero row, where the
    original gives the bias). A mean over the batch axis mixes samples, which a LayerNormalization
    over the trailing axes spells only with its scale broadcast over the batch: ORT leaves these
    alone too, and so does fusion."""
    held = float(np.float32(epsilon))
    if epsilon and abs(held - epsilon) > 1e-3 * abs(epsilon):
        lost = "underflows" if abs(held) < abs(epsilon) else "overflows"
        raise NotFused(f"epsilon {epsilon:g} {lost} the fused op's float attribute (float32 holds {held:g})")
    if layout.rank is not None and layout.rank > 1 and 0 in layout.axes:
        where = "every axis" if len(layout.axes) == layout.rank else f"axes {list(layout.axes)}"
        raise NotFused(f"the mean is over {where}, batch included")


def _lifts(front: list[ir.Node], source: ir.Value) -> set[ir.Node]:
    """The Casts inside a match (a mixed-precision norm): each must lift an fp16/bf16 tensor to
    fp32, go back to the norm's own type, or change nothing, since the fused op computes in its
    input's type or, with stash_type=1, in fp32; any other Cast rounds where the fused op would not."""
    casts = {node for node in front if node.op_type == "Cast"}
    own = elem_type(source)
    for cast in casts:
        to, before = attribute(cast, "to"), elem_type(cast.inputs[0])
        if to in (before, own) or to == int(ir.DataType.FLOAT) and before in _LOW_PRECISION:
            continue
        raise NotFused(f"a Cast from {_type_name(before)} to {_type_name(to)} inside the norm: the fused op computes "
                       f"in its input's {_type_name(own)} or in float32, so fusing would change the numbers", cast)
    return casts


def _check_output_type(fused_input: ir.Value, output: ir.Value) -> None:
    """The fused op gives its input's type: a norm whose output is of another type (an fp16 one
    computed in fp32 with no Cast back) is no such op."""
    before, after = elem_type(fused_input), elem_type(output)
    if before and after and before != after:
        raise NotFused(f"the norm's output '{output.name}' is {_type_name(after)} but its input '{fused_input.name}' "
                       f"is {_type_name(before)}, and no Cast back follows: the fused op gives its input's type")


def _type_name(elem: int | None) -> str:
    return "an unknown type" if not elem else ir.DataType(elem).name.lower()


def _input_cast(source: ir.Value) -> tuple[ir.Node | None, ir.Value]:
    """The Cast that lifts a fp16/bf16 tensor into the fp32 island, if `source` comes from one."""
    node = source.producer()
    if node is not None and node.op_type == "Cast" and attribute(node, "to") == int(ir.DataType.FLOAT):
        low = node.inputs[0]
        if low is not None and elem_type(low) in _LOW_PRECISION:
            return node, low
    return None, source


def _absorb_affine(start: ir.Value, layout: Layout, allow_bias: bool, cast_to: int | None, fed: bool) -> _Affine:
    """Take the per-feature Mul (scale), Add (bias) and the Cast back to the input's dtype that
    follow a normalization, while each is the only reader and its operand is a constant.
    A non-constant or non-per-feature operand stays outside as its own node."""
    affine = _Affine([], start)
    while True:
        node = sole_reader(affine.output)
        if node is None:
            return affine
        fed_here = fed and (cast_to is None or affine.cast_back)  # the type here is the fused node's
        if node.op_type == "Cast" and cast_to is not None and not affine.cast_back and attribute(node, "to") == cast_to:
            affine.cast_back = True
        elif node.op_type == "Mul" and affine.scale is None and affine.bias is None:
            affine.scale = _param(other_input(node, affine.output), layout, affine, fed_here)
            if affine.scale is None:
                return affine
        elif node.op_type == "Add" and allow_bias and affine.bias is None:
            affine.bias = _param(other_input(node, affine.output), layout, affine, fed_here)
            if affine.bias is None:
                return affine
        else:
            return affine
        affine.nodes.append(node)
        affine.output = node.outputs[0]


def _param(operand: ir.Value | None, layout: Layout, affine: _Affine, fed: bool) -> Param:
    """The per-feature constant `operand` holds, or `operand` itself when it is a graph input of
    the normalized dims and of the fused node's type, where `fed` ones may be taken (the rule
    allows it, and the type here is the fused node's: no Cast into fp32, or after the Cast back)."""
    found = layout.feature_param(constant(operand))
    if found is not None or operand is None or not operand.is_graph_input():
        return found
    fits = fed and elem_type(operand) == elem_type(affine.output, deep=True)
    return operand if fits and layout.fits_fed(operand) else None


def _with_plumbing(members: set[ir.Node]) -> set[ir.Node]:
    """Add the constants and shape computations (Shape -> Gather -> Concat ...) that exist only to
    feed the matched nodes: they die with the match. Only Constant nodes and nodes with integer
    outputs qualify, so the data path into the normalization is never taken."""
    pending = list(members)
    while pending:
        for value in pending.pop().inputs:
            node = producer(value)
            if value is None or node is None or node in members or node.graph is not value.graph:
                continue
            plumbing = node.op_type == "Constant" or all(elem_type(o) in _INDEX_TYPES for o in node.outputs)
            private = all(not escapes(o) and set(readers(o)) <= members for o in node.outputs)
            if plumbing and private:
                members.add(node)
                pending.append(node)
    return members


def _check_private(nodes: list[ir.Node], output: ir.Value, kind: str, names: NodeNames) -> None:
    """Every tensor inside the match must be read only inside it, or fusing would remove it."""
    members = set(nodes)
    for member in nodes:
        for value in member.outputs:
            if value is output:
                continue
            if escapes(value):
                raise NotFused(f"the intermediate '{value.name}' escapes (a graph output, or read inside a subgraph)",
                               member)
            for reader in readers(value):
                if reader not in members:
                    raise NotFused(f"the intermediate '{value.name}' is also read by {reader.op_type} "
                                   f"'{names.get(reader, reader.name)}' outside the {kind}", member)
