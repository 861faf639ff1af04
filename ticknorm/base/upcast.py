"""A bf16 graph as ONNX Runtime's CPU provider can run it: in fp32, every bf16 value rounded to bf16.

The CPU provider has no bf16 kernels for Add, Mul or MatMul (NOT_IMPLEMENTED at session creation),
so a bf16 graph cannot be checked there as it is. Its upcast computes the same values up to the
rounding inside each op: each bf16 weight becomes the fp32 number it is (exactly), each op computes
in fp32 on those values, and each value the graph holds in bf16 is rounded to bf16 where it is
made (a Cast to bf16 and back), as `convert` emulates a precision before it writes one.
"""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper
from onnx_ir.passes.common import NameFixPass

from ticknorm.base.graph import UniqueNames, typed
from ticknorm.base.scopes import SCOPE_KEY, set_scope

BF16, FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT


def upcast_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32 emulation of a bf16 graph (see the module's docstring), edited on onnx-ir. Its bf16
    weights are not read: each is widened by a Cast to fp32 in the graph, so they stay references
    into their file (mapped by the session, which folds the Cast once as it loads)."""
    types = {name: value.dtype for name, value in ir.convenience.create_value_mapping(
        typed(model).graph, include_subgraphs=False).items()}
    upcast = ir.from_proto(model)
    graph = upcast.graph
    nodes = list(graph)
    widened = [_widening(graph, weight) for weight in graph.initializers.values() if weight.dtype == BF16]
    if widened and nodes:  # first in the graph
        graph.insert_before(nodes[0], widened)
    for node in nodes:
        for attribute in list(node.attributes.values()):
            node.attributes[attribute.name] = _upcast_attribute(attribute)
        for value in node.outputs:
            if types.get(value.name) == BF16:
                _round_after(graph, node, value)
    for cast in widened:  # on its first reader's module, as a weight belongs to the module that reads it
        scope = next((user.metadata_props.get(SCOPE_KEY) for user in graph if cast.outputs[0] in user.inputs), None)
        if scope is not None:
            cast.metadata_props[SCOPE_KEY] = scope
    for value in [*graph.inputs, *graph.outputs, *(v for node in nodes for v in node.outputs)]:
        if value.dtype == BF16:
            value.type = ir.TensorType(ir.DataType.FLOAT)
    NameFixPass()(upcast)  # a name given below (`w_fp32`, `y_low`) that the graph already had made unique
    return ir.to_proto(upcast)


def _widening(graph: ir.Graph, weight: ir.Value) -> ir.Node:
    """A Cast to fp32 of a bf16 weight, read in its place by every node of the graph (a subgraph's
    reads are left as they were)."""
    cast = ir.node("Cast", [weight], {"to": FLOAT}, name=f"{weight.name}_widen")
    cast.outputs[0].name = f"{weight.name}_fp32"
    for user, index in list(weight.uses()):
        if user.graph is graph:
            user.replace_input_with(index, cast.outputs[0])
    return cast


def _round_after(graph: ir.Graph, node: ir.Node, value: ir.Value) -> None:
    """`value`, made in fp32, rounded to bf16 and back right after `node` (on its module): its
    readers (a subgraph's too) and the graph's outputs read the rounded value, under its name."""
    name, scope = value.name, {SCOPE_KEY: node.metadata_props.get(SCOPE_KEY) or ""}
    down = ir.node("Cast", [value], {"to": BF16}, name=f"{name}_round", metadata_props=dict(scope))
    up = ir.node("Cast", down.outputs, {"to": FLOAT}, name=f"{name}_unround", metadata_props=dict(scope))
    down.outputs[0].name = f"{name}_low"
    value.replace_all_uses_with(up.outputs[0], replace_graph_outputs=True)
    down.replace_input_with(0, value)
    value.name, up.outputs[0].name = f"{name}_fp32", name
    if value.type is not None:  # the type and shape it declared, in fp32
        up.outputs[0].type, up.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), value.shape
    graph.insert_after(node, [down, up])


def round_trip_nodes(names: UniqueNames, source: str, target: str, low: int, scope: str | None) -> list:
    """`target` as `source` rounded to the `low` type and back to fp32 (a Cast there and back, on
    `scope`): how an emulation holds a value the low graph holds low."""
    held = names.fresh(f"{target}_low")
    down = helper.make_node("Cast", [source], [held], to=low, name=names.fresh(f"{target}_round"))
    up = helper.make_node("Cast", [held], [target], to=FLOAT, name=names.fresh(f"{target}_unround"))
    for cast in (down, up):
        set_scope(cast, scope or "")
    return [down, up]


def _upcast_attribute(attribute: ir.Attr) -> ir.Attr:
    """A Cast to bf16 computes in fp32 (its output is rounded after it); a bf16 constant is the fp32
    number it is."""
    if attribute.name == "to" and attribute.type == ir.AttributeType.INT and attribute.value == BF16:
        return ir.AttrInt64(attribute.name, FLOAT)
    if attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == ir.DataType.BFLOAT16:
        tensor = attribute.value
        return ir.AttrTensor(attribute.name, ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name))
    return attribute
