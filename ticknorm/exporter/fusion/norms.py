"""What a matched normalization is, and the checks every match must pass before it is fused."""

from dataclasses import dataclass, field

import numpy as np
import onnx

from ticknorm.base.graph import GraphIndex, attr
from ticknorm.exporter.fusion.patterns import Layout, NotFused, absorb_affine, Tail
from ticknorm.base.scopes import common_scope, get_scope

_LOW_PRECISION = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass
class NormMatch:
    """A normalization ready to be replaced by one node."""

    kind: str  # "LayerNorm" or "RMSNorm"
    nodes: list  # indices of the nodes it replaces
    input: str
    output: str
    layout: Layout
    epsilon: float
    scale: np.ndarray | None
    bias: np.ndarray | None
    elem_type: int
    scope: str
    anchor: str  # name of the first original node, for the report
    notes: list = field(default_factory=list)


@dataclass
class NormRefusal:
    """Something that looks like a normalization and is not fused, with the reason."""

    kind: str
    reason: str
    node: str
    scope: str


def complete_match(index: GraphIndex, kind: str, source: str, layout: Layout, front: list, tail: Tail,
                   allow_bias: bool) -> NormMatch:
    """Add the affine part and the dtype casts, then check that the rewrite is safe."""
    if layout.rank is None and not layout.trailing:
        raise NotFused(f"the rank of '{source}' is unknown, so axes {list(layout.axes)} cannot be checked")
    cast_node, cast_source = _input_cast(index, source)
    cast_to = index.elem_type(cast_source) if cast_node is not None else None
    affine = absorb_affine(index, tail.output, layout, allow_bias, cast_to)
    nodes = sorted(set(front + tail.nodes + affine.nodes))
    if affine.cast_back and all(r in nodes for r in index.consumer_nodes(source)):
        nodes = sorted(nodes + [cast_node])
    nodes = _with_plumbing(index, nodes)
    dims = layout.static_dims(affine.scale, affine.bias)
    if dims is None:
        raise NotFused(f"the normalized dims of '{source}' are not static, so scale and bias cannot be built")
    _check_private(index, nodes, affine.output, kind)
    notes = []
    if layout.permutation is not None:
        notes.append(f"axes {list(layout.axes)} moved last with Transpose {layout.permutation}")
    if affine.cast_back:
        notes.append("Cast pair absorbed: computed in fp32 via stash_type=1")
    elem_type = index.elem_type(cast_source if affine.cast_back else source)
    return NormMatch(kind, nodes, cast_source if affine.cast_back else source, affine.output,
                     Layout(layout.rank, layout.axes, dims), tail.epsilon, affine.scale, affine.bias,
                     elem_type, common_scope(get_scope(index.nodes[n]) or "" for n in nodes),
                     index.node_name(nodes[0]), notes)


def _input_cast(index: GraphIndex, source: str) -> tuple[int | None, str]:
    """The Cast that lifts a fp16/bf16 tensor into the fp32 island, if `source` comes from one."""
    producer, node = index.producer_op(source)
    if node is not None and node.op_type == "Cast" and attr(node, "to") == onnx.TensorProto.FLOAT:
        if index.elem_type(node.input[0]) in _LOW_PRECISION:
            return producer, node.input[0]
    return None, source


_INDEX_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def _with_plumbing(index: GraphIndex, nodes: list) -> list:
    """Add the constants and shape computations (Shape -> Gather -> Concat ...) that exist only to
    feed the matched nodes: they die with the match. Only Constant nodes and nodes with integer
    outputs qualify, so the data path into the normalization is never taken."""
    members = set(nodes)
    pending = list(nodes)
    while pending:
        for name in index.nodes[pending.pop()].input:
            producer, node = index.producer_op(name)
            if producer is None or producer in members:
                continue
            outputs = [o for o in node.output if o]
            plumbing = node.op_type == "Constant" or all(index.elem_type(o) in _INDEX_TYPES for o in outputs)
            private = all(o not in index.graph_outputs and set(index.consumer_nodes(o)) <= members for o in outputs)
            if plumbing and private:
                members.add(producer)
                pending.append(producer)
    return sorted(members)


def _check_private(index: GraphIndex, nodes: list, output: str, kind: str) -> None:
    """Every tensor inside the match must be read only inside it, or fusing would remove it."""
    members = set(nodes)
    for member in nodes:
        for name in index.nodes[member].output:
            if name == output:
                continue
            if name in index.graph_outputs:
                raise NotFused(f"the intermediate '{name}' escapes (a graph output, or read inside a subgraph)",
                           index.node_name(member))
            for reader in index.consumer_nodes(name):
                if reader not in members:
                    raise NotFused(
                        f"the intermediate '{name}' is also read by {index.nodes[reader].op_type} "
                        f"'{index.node_name(reader)}' outside the {kind}", index.node_name(member))


def refusal(index: GraphIndex, kind: str, anchor: int, error: NotFused) -> NormRefusal:
    return NormRefusal(kind, error.reason, error.node or index.node_name(anchor),
                       get_scope(index.nodes[anchor]) or "")
