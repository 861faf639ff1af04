"""A bf16 graph as ONNX Runtime's CPU provider can run it: in fp32, every bf16 value rounded to bf16.

The CPU provider has no bf16 kernels for Add, Mul or MatMul (NOT_IMPLEMENTED at session creation),
so a bf16 graph cannot be checked there as it is. Its upcast computes the same values up to the
rounding inside each op: each bf16 weight becomes the fp32 number it is (exactly), each op computes
in fp32 on those values, and each value the graph holds in bf16 is rounded to bf16 where it is
made (a Cast to bf16 and back), as `convert` emulates a precision before it writes one.
"""

import onnx
from onnx import TensorProto, helper, numpy_helper

from ticknorm.base.graph import UniqueNames
from ticknorm.base.scopes import get_scope, set_scope

BF16, FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT


def upcast_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32 emulation of a bf16 graph (see the module's docstring). Its bf16 weights are not
    read: each is widened by a Cast to fp32 in the graph, so they stay references into their file
    (mapped by the session, which folds the Cast once as it loads)."""
    typed = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.input,
                                                             *typed.graph.output]}
    upcast = onnx.ModelProto()
    upcast.CopyFrom(model)
    graph = upcast.graph
    names = UniqueNames(upcast)
    widened = [_widening(tensor.name, names) for tensor in graph.initializer if tensor.data_type == BF16]
    renamed = {cast.input[0]: cast.output[0] for cast in widened}
    nodes = list(widened)
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        for attribute in node.attribute:
            _upcast_attribute(attribute)
        nodes.append(node)
        for slot, name in enumerate(node.output):
            if name and types.get(name) == BF16:
                made = names.fresh(f"{name}_fp32")
                node.output[slot] = made
                nodes += round_trip_nodes(names, made, name, BF16, get_scope(node))
    for cast in widened:  # on its first reader's module, as a weight belongs to the module that reads it
        scope = next((get_scope(n) for n in nodes if cast.output[0] in n.input), None)
        if scope is not None:
            set_scope(cast, scope)
    del graph.node[:]
    graph.node.extend(nodes)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == BF16:
            value.type.tensor_type.elem_type = FLOAT
    return upcast


def _widening(weight: str, names: UniqueNames) -> onnx.NodeProto:
    return helper.make_node("Cast", [weight], [names.fresh(f"{weight}_fp32")], to=FLOAT,
                            name=names.fresh(f"{weight}_widen"))


def round_trip_nodes(names: UniqueNames, source: str, target: str, low: int, scope: str | None) -> list:
    """`target` as `source` rounded to the `low` type and back to fp32 (a Cast there and back, on
    `scope`): how an emulation holds a value the low graph holds low."""
    held = names.fresh(f"{target}_low")
    down = helper.make_node("Cast", [source], [held], to=low, name=names.fresh(f"{target}_round"))
    up = helper.make_node("Cast", [held], [target], to=FLOAT, name=names.fresh(f"{target}_unround"))
    for cast in (down, up):
        set_scope(cast, scope or "")
    return [down, up]


def _upcast_attribute(attribute: onnx.AttributeProto) -> None:
    """A Cast to bf16 computes in fp32 (its output is rounded after it); a bf16 constant is the fp32
    number it is."""
    if attribute.name == "to" and attribute.i == BF16:
        attribute.i = FLOAT
    if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == BF16:
        attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype("float32"), attribute.t.name))
