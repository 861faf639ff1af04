"""`--ln-target plugin`: turn LayerNormalization nodes into ticknorm's TensorRT plugin op.

TensorRT's ONNX parser sends an op it does not know to the plugin registry, looking the creator up
by the node's op type and its `plugin_namespace` / `plugin_version` attributes and filling the
plugin's fields from the attributes of the same names (`epsilon`, `axis`). The op lives in its own
ONNX domain so that the file stays valid ONNX and no runtime mistakes it for a standard op.

The plugin always takes (X, scale, bias): a missing bias becomes a zeros initializer. A node is left
as TensorRT's own normalization, with the reason reported, where the plugin cannot stand in for it:
its Mean/InvStdDev outputs are read, its dtype is not fp32/fp16/bf16, its scale's shape is not
known, or its rows are longer than the kernel holds."""

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from ticknorm.base.errors import FusionError
from ticknorm.base.graph import FreshNames, default_opset, node_name, typed
from ticknorm.plugins import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from ticknorm.plugins.launch import MAX_HIDDEN

LN_TARGETS = ("native", "plugin")
PLUGIN_ELEM_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclass
class PluginTargetResult:
    model: onnx.ModelProto
    converted: list[str] = field(default_factory=list)  # names of the nodes now on the plugin
    kept: dict[str, str] = field(default_factory=dict)  # by node name: why it stays a LayerNormalization

    def summary(self) -> str:
        lines = [f"{len(self.converted)} LayerNormalization node(s) now {PLUGIN_NAMESPACE}::{PLUGIN_NAME} "
                 f"(TensorRT plugin), {len(self.kept)} kept as TensorRT's own layer"]
        lines += [f"  kept {name}: {reason}" for name, reason in self.kept.items()]
        return "\n".join(lines)


def to_plugin_target(model: onnx.ModelProto) -> PluginTargetResult:
    """A copy of `model` where every LayerNormalization the plugin can compute is the plugin op.
    Only top-level nodes: TensorRT parses If/Loop bodies, but nothing we export puts a norm there.
    Types and dims are read from a typed view of the graph; below opset 17 the fused
    LayerNormalization nodes (ONNX Runtime's op there) stop ONNX shape inference, so the view
    infers at opset 17 (only this rewrite reads it, nothing writes it)."""
    rewritten = ir.from_proto(model)
    graph, view = rewritten.graph, typed(model, opset=17).graph
    names = FreshNames(graph)
    result = PluginTargetResult(model)
    for position, (node, seen) in enumerate(zip(list(graph), view)):
        if node.op_type != "LayerNormalization" or node.domain != "":
            continue
        name = node_name(node, position)
        reason, hidden_dims = _plugin_problem(seen)
        if reason:
            result.kept[name] = reason
            continue
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is None:
            bias = _zero_bias(names, node, seen, hidden_dims)
            graph.register_initializer(bias)
        plugin = _plugin_node(node, name, bias)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [plugin], node.outputs[:1], plugin.outputs)
        result.converted.append(name)
    opset = default_opset(rewritten)
    if result.kept and opset < 17:
        first = next(iter(result.kept.items()))
        raise FusionError(f"LayerNormalization {first[0]} cannot go on the plugin ({first[1]}), and opset "
                          f"{opset} has no LayerNormalization to keep it as; use --opset 17 or newer")
    if result.converted:
        rewritten.opset_imports.setdefault(PLUGIN_NAMESPACE, int(PLUGIN_VERSION))
        result.model = ir.to_proto(rewritten)
    return result


def _plugin_problem(node: ir.Node) -> tuple[str, tuple]:
    """Why the plugin cannot compute `node` of the typed view ('' when it can), and the normalized dims."""
    if any(output.name for output in node.outputs[1:]):
        return "its Mean/InvStdDev outputs are used, which the plugin does not produce", ()
    x = node.inputs[0]
    elem_type = x.dtype if x is not None else None
    if elem_type not in PLUGIN_ELEM_TYPES:
        kind = elem_type.name if elem_type else "unknown"
        return f"its input dtype is {kind}; the plugin takes float, float16 or bfloat16", ()
    dims = _dims(node.inputs[1])
    if dims is None or not all(isinstance(d, int) for d in dims):
        return "the shape of its scale is not known statically", ()
    x_dims = _dims(x)
    axis = node.attributes.get_int("axis", -1)
    normalized = tuple(x_dims[axis:]) if x_dims is not None and -len(x_dims) <= axis < len(x_dims) else None
    params = [dims] + ([_dims(node.inputs[2])] if len(node.inputs) > 2 and node.inputs[2] is not None else [])
    if any(tuple(p or ()) != normalized for p in params):
        # The kernel reads one scale and bias value per normalized element: no broadcasting.
        return f"its scale/bias are not of the normalized shape {normalized}; the plugin does not broadcast them", ()
    hidden = math.prod(dims)
    if hidden > MAX_HIDDEN:
        return f"it normalizes {hidden} elements per row; the plugin kernel holds at most {MAX_HIDDEN}", ()
    return "", tuple(dims)


def _dims(value: ir.Value | None) -> tuple | None:
    """A value's dims (int when static, the name or None when not), None when its rank is unknown
    (or the input is missing)."""
    if value is None or value.shape is None:
        return None
    return tuple(dim if isinstance(dim, int) else dim.value for dim in value.shape)


def _zero_bias(names: FreshNames, node: ir.Node, seen: ir.Node, dims: tuple) -> ir.Value:
    """The zeros the plugin takes for a norm without a bias, named after its scale, in the type of
    its input in the typed view (`seen`), which `_plugin_problem` found to be one the plugin takes."""
    scale, x = node.inputs[1], seen.inputs[0]
    if scale is None or x is None or x.dtype is None:
        raise FusionError(f"LayerNormalization {seen.name} has no input or scale, which ONNX requires of it")
    bias = ir.Value(name=names.fresh(f"{scale.name}.zero_bias"))
    bias.const_value = ir.Tensor(np.zeros(dims, x.dtype.numpy()), name=bias.name)
    return bias


def _plugin_node(node: ir.Node, name: str, bias: ir.Value) -> ir.Node:
    """The plugin op on the norm's input and scale, with its epsilon and axis and its module scope."""
    attributes: dict[str, int | float | str] = {
        "axis": node.attributes.get_int("axis", -1), "epsilon": node.attributes.get_float("epsilon", 1e-5),
        "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
    return ir.node(PLUGIN_NAME, [node.inputs[0], node.inputs[1], bias], attributes, domain=PLUGIN_NAMESPACE, name=name,
                   doc_string=node.doc_string, metadata_props=dict(node.metadata_props))
