"""A bf16 graph as ONNX Runtime's CPU provider can run it: in fp32, every bf16 value rounded to bf16;
and a low-precision graph in plain fp32 (`widened`), the reference a file judged alone is held to.

The CPU provider has no bf16 kernels for Add, Mul or MatMul (NOT_IMPLEMENTED at session creation),
so a bf16 graph cannot be checked there as it is. Its upcast computes the same values up to the
rounding inside each op: each bf16 weight becomes the fp32 number it is (exactly), each op computes
in fp32 on those values, and each value the graph holds in bf16 is rounded to bf16 where it is
made (a Cast to bf16 and back), as `convert` emulates a precision before it writes one.
"""

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto

from ticknorm.base.graph import FreshNames, typed
from ticknorm.base.scopes import SCOPE_KEY, node_scope

BF16, FP16, FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT16, TensorProto.FLOAT
LOW = frozenset({BF16, FP16})


def upcast_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32 emulation of a bf16 graph (see the module's docstring), edited on onnx-ir."""
    return _upcast(model, frozenset({BF16}), rounded=True)


def widened(model: onnx.ModelProto) -> onnx.ModelProto:
    """A fp16 or bf16 graph (or one with fp32 islands) computing every value in fp32, nothing
    rounded: what its low type approximates, so the judge of a file that has no fp32 original."""
    return _upcast(model, LOW, rounded=False)


def _upcast(model: onnx.ModelProto, lows: frozenset[int], rounded: bool) -> onnx.ModelProto:
    """`model` with every value of the `lows` types held in fp32 (`rounded`: rounded to its type
    where it is made), If, Loop and Scan bodies too (a converted merged decoder computes in its
    branches). Its low weights are not read: each is widened by a Cast to fp32 in its graph, so
    they stay references into their file (mapped by the session, which folds the Cast once as it
    loads)."""
    types = {name: value.dtype for name, value in ir.convenience.create_value_mapping(
        typed(model).graph, include_subgraphs=True).items()}
    upcast = ir.from_proto(model)
    names = FreshNames(upcast.graph)
    for graph in list(upcast.graphs()):  # the graph and its bodies at any depth
        _upcast_graph(graph, names, types, _Upcast(lows, rounded))
    return ir.to_proto(upcast)


@dataclass(frozen=True)
class _Upcast:
    lows: frozenset[int]  # the types held in fp32
    rounded: bool  # each value rounded to its type where it is made


def _upcast_graph(graph: ir.Graph, names: FreshNames, types: dict[str, ir.DataType | None], how: _Upcast) -> None:
    lows, rounded = how.lows, how.rounded
    nodes = list(graph)
    casts = [_widening(graph, names, weight) for weight in graph.initializers.values() if weight.dtype in lows]
    if casts and nodes:  # first in the graph
        graph.insert_before(nodes[0], casts)
    for node in nodes:
        for attribute in list(node.attributes.values()):
            node.attributes[attribute.name] = _upcast_attribute(attribute, lows)
        for value in node.outputs:
            low = types.get(value.name) if rounded and value.name is not None else None
            if low is not None and low in lows:
                _round_after(graph, names, node, value, int(low))
    for cast in casts:  # on its first reader's module, as a weight belongs to the module that reads it
        scope = next((user.metadata_props.get(SCOPE_KEY) for user in graph if cast.outputs[0] in user.inputs), None)
        if scope is not None:
            cast.metadata_props[SCOPE_KEY] = scope
    for value in [*graph.inputs, *graph.outputs, *(v for node in nodes for v in node.outputs)]:
        if value.dtype in lows:
            value.type = ir.TensorType(ir.DataType.FLOAT)


def _widening(graph: ir.Graph, names: FreshNames, weight: ir.Value) -> ir.Node:
    """A Cast to fp32 of a low weight, read in its place by every node, a body's too (the Cast,
    first in the weight's graph, is in scope there)."""
    cast = ir.node("Cast", [weight], {"to": FLOAT}, name=names.fresh(f"{weight.name}_widen"))
    cast.outputs[0].name = names.fresh(f"{weight.name}_fp32")
    for user, index in list(weight.uses()):
        if user is not cast:
            user.replace_input_with(index, cast.outputs[0])
    return cast


def _round_after(graph: ir.Graph, names: FreshNames, node: ir.Node, value: ir.Value, low: int) -> None:
    """`value`, made in fp32, rounded to its `low` type and back right after `node` (on its module): its
    readers (a subgraph's too) and the graph's outputs read the rounded value, under its name."""
    rounded = ir.Value(name=value.name)
    if value.type is not None:  # the type and shape it declared, in fp32
        rounded.type, rounded.shape = ir.TensorType(ir.DataType.FLOAT), value.shape
    value.replace_all_uses_with(rounded, replace_graph_outputs=True)
    value.name = names.fresh(f"{rounded.name}_fp32")
    graph.insert_after(node, round_trip(names, value, rounded, low, node_scope(node)))


def round_trip(names: FreshNames, source: ir.Value, target: ir.Value, low: int, module: str) -> list[ir.Node]:
    """The Casts making `target` from `source` rounded to the `low` type and back to fp32 (on
    `module`): how an emulation holds a value the graph it emulates holds low."""
    held = ir.Value(name=names.fresh(f"{target.name}_low"))
    down = ir.node("Cast", [source], {"to": low}, outputs=[held], name=names.fresh(f"{target.name}_round"),
                   metadata_props={SCOPE_KEY: module})
    up = ir.node("Cast", [held], {"to": FLOAT}, outputs=[target], name=names.fresh(f"{target.name}_unround"),
                 metadata_props={SCOPE_KEY: module})
    return [down, up]


def _upcast_attribute(attribute: ir.Attr, lows: frozenset[int]) -> ir.Attr:
    """A Cast to a low type computes in fp32 (its output is rounded after it, where rounded); a low
    constant is the fp32 number it is."""
    if attribute.name == "to" and attribute.type == ir.AttributeType.INT and attribute.value in lows:
        return ir.AttrInt64(attribute.name, FLOAT)
    if attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype in lows:
        tensor = attribute.value
        return ir.AttrTensor(attribute.name, ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name))
    return attribute
