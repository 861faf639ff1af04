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
from onnx import helper, numpy_helper

from ticknorm.base.errors import FusionError
from ticknorm.base.graph import GraphIndex, UniqueNames, rebuilt
from ticknorm.plugins import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from ticknorm.plugins.launch import MAX_HIDDEN

LN_TARGETS = ("native", "plugin")
PLUGIN_ELEM_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclass
class PluginTargetResult:
    model: onnx.ModelProto
    converted: list = field(default_factory=list)  # node names now on the plugin
    kept: dict = field(default_factory=dict)  # node name -> why it stays a LayerNormalization

    def summary(self) -> str:
        lines = [f"{len(self.converted)} LayerNormalization node(s) now {PLUGIN_NAMESPACE}::{PLUGIN_NAME} "
                 f"(TensorRT plugin), {len(self.kept)} kept as TensorRT's own layer"]
        lines += [f"  kept {name}: {reason}" for name, reason in self.kept.items()]
        return "\n".join(lines)


def to_plugin_target(model: onnx.ModelProto) -> PluginTargetResult:
    """A copy of `model` where every LayerNormalization the plugin can compute is the plugin op.
    Only top-level nodes: TensorRT parses If/Loop bodies, but nothing we export puts a norm there."""
    index = _typed_index(model)
    names = UniqueNames(model)
    result = PluginTargetResult(model)
    nodes, created = [], []
    for position, node in enumerate(model.graph.node):
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        name = index.node_name(position)
        reason, hidden_dims = _plugin_problem(index, node)
        if reason:
            result.kept[name] = reason
            nodes.append(node)
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        if not bias:
            bias = names.fresh(f"{node.input[1]}.zero_bias")
            dtype = helper.tensor_dtype_to_np_dtype(index.elem_type(node.input[0]))
            created.append(numpy_helper.from_array(np.zeros(hidden_dims, dtype), bias))
        nodes.append(_plugin_node(node, name, bias))
        result.converted.append(name)
    if result.kept and index.opset < 17:
        first = next(iter(result.kept.items()))
        raise FusionError(f"LayerNormalization {first[0]} cannot go on the plugin ({first[1]}), and opset "
                          f"{index.opset} has no LayerNormalization to keep it as; use --opset 17 or newer")
    if result.converted:
        converted = rebuilt(model, nodes, list(model.graph.initializer) + created)
        if not any(o.domain == PLUGIN_NAMESPACE for o in converted.opset_import):
            converted.opset_import.append(helper.make_opsetid(PLUGIN_NAMESPACE, int(PLUGIN_VERSION)))
        result.model = converted
    return result


def _typed_index(model: onnx.ModelProto) -> GraphIndex:
    """The graph indexed with its tensor types. Below opset 17 the fused LayerNormalization nodes
    (ONNX Runtime's op there) stop ONNX shape inference; types then come from a view of the graph
    at opset 17, which only this rewrite reads and nothing writes."""
    index = GraphIndex(model)
    if index.opset >= 17:
        return index
    view = onnx.ModelProto()
    view.CopyFrom(model)
    for opset in view.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 17
    typed = GraphIndex(view)
    typed.opset = index.opset
    return typed


def _plugin_problem(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, tuple]:
    """Why the plugin cannot compute `node` ('' when it can), and the normalized dims."""
    if any(output for output in node.output[1:]):
        return "its Mean/InvStdDev outputs are used, which the plugin does not produce", ()
    elem_type = index.elem_type(node.input[0])
    if elem_type not in PLUGIN_ELEM_TYPES:
        kind = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "unknown"
        return f"its input dtype is {kind}; the plugin takes float, float16 or bfloat16", ()
    dims = index.dims(node.input[1])
    if dims is None or not all(isinstance(d, int) for d in dims):
        return "the shape of its scale is not known statically", ()
    x_dims = index.dims(node.input[0])
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
    normalized = tuple(x_dims[axis:]) if x_dims is not None and -len(x_dims) <= axis < len(x_dims) else None
    params = [dims] + ([index.dims(node.input[2])] if len(node.input) > 2 and node.input[2] else [])
    if any(tuple(p or ()) != normalized for p in params):
        # The kernel reads one scale and bias value per normalized element: no broadcasting.
        return f"its scale/bias are not of the normalized shape {normalized}; the plugin does not broadcast them", ()
    hidden = math.prod(dims)
    if hidden > MAX_HIDDEN:
        return f"it normalizes {hidden} elements per row; the plugin kernel holds at most {MAX_HIDDEN}", ()
    return "", tuple(dims)


def _plugin_node(node: onnx.NodeProto, name: str, bias: str) -> onnx.NodeProto:
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    plugin = helper.make_node(PLUGIN_NAME, [node.input[0], node.input[1], bias], [node.output[0]], name,
                              domain=PLUGIN_NAMESPACE, epsilon=float(attributes.get("epsilon", 1e-5)),
                              axis=int(attributes.get("axis", -1)), plugin_namespace=PLUGIN_NAMESPACE,
                              plugin_version=PLUGIN_VERSION)
    plugin.metadata_props.extend(node.metadata_props)  # the module scope goes with it
    plugin.doc_string = node.doc_string
    return plugin
