"""Replace matched normalizations by single nodes, keeping names, order and module scopes."""

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ticknorm.base.graph import FreshNames
from ticknorm.base.scopes import SCOPE_KEY
from ticknorm.exporter.fusion.norms import NormMatch

# The op each kind becomes, and the first default-domain opset that has it.
FUSED_OPS = {"LayerNorm": ("LayerNormalization", 17), "RMSNorm": ("RMSNormalization", 23)}
# ONNX Runtime's own fused RMSNorm, registered in the default domain at every opset: what its
# optimizer and the GenAI model builder write. Runtimes other than ONNX Runtime do not take it.
ORT_RMS_NORM = "SimplifiedLayerNormalization"
# auto: RMSNormalization at opset 23+, ONNX Runtime's op below; onnx: RMSNormalization only (left
# decomposed below 23); ort: ONNX Runtime's op at any opset.
RMS_TARGETS = ("auto", "onnx", "ort")
# An initializer's contents as a dict key: its ONNX data type, shape, little-endian bytes (as the
# file holds them: a weight is not decoded to be compared).
ParamKey = tuple[int, tuple[int, ...], bytes]


@dataclass(frozen=True)
class NormTargets:
    """What each kind of norm becomes. With `plugin`, LayerNorms go on to the TensorRT plugin op
    (a domain of its own, any opset): they fuse below opset 17 too, as the LayerNormalization that
    ONNX Runtime runs at any opset, so that verification sees them before the plugin rewrite."""

    rms: str = "auto"
    plugin: bool = False

    def op(self, kind: str, opset: int) -> tuple[str, int]:
        """The op a `kind` of norm becomes in a graph of `opset`, and the opset that op needs."""
        op_type, needs = FUSED_OPS[kind]
        if kind == "RMSNorm" and (self.rms == "ort" or (self.rms == "auto" and opset < needs)):
            return ORT_RMS_NORM, 1
        if kind == "LayerNorm" and self.plugin:
            return op_type, 1
        return op_type, needs


def rewrite_matches(graph: ir.Graph, matches: list[NormMatch], op_types: dict[str, str], names: FreshNames,
                    reusable: dict[ParamKey, ir.Value]) -> None:
    """In place: each match becomes one fused node (of `op_types[kind]`) placed where its last
    node was, under the name of the tensor the match computed. `reusable` (`reusable_params`):
    initializers a fused node points to instead of storing a copy."""
    for match in matches:
        nodes, params = _fused_nodes(match, op_types[match.kind], names, reusable)
        for param in params:
            graph.register_initializer(param)
        ir.convenience.replace_nodes_and_values(graph, match.nodes[-1], match.nodes, nodes, [match.output_value],
                                                [nodes[-1].outputs[0]])


def reusable_params(graphs: list[ir.Graph], matches: list[NormMatch]) -> dict[ParamKey, ir.Value]:
    """Existing initializers (of `graphs`: the one rewritten and those around it) a fused node
    can point to instead of storing a copy. Staged weights are not read to find out."""
    shapes = {m.dims for m in matches}
    found: dict[ParamKey, ir.Value] = {}
    for graph in graphs:
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor) or value.is_graph_input():
                continue
            shape = tuple(tensor.shape.numpy())
            if shape in shapes:
                found.setdefault((int(tensor.dtype), shape, tensor.tobytes()), value)
    return found


def _param(value, match: NormMatch, stem: str, names: FreshNames, reusable: dict[ParamKey, ir.Value],
           created: list[ir.Value]) -> ir.Value:
    if isinstance(value, ir.Value):  # a graph input of the normalized dims: read as it is
        return value
    assert match.dims is not None  # `norms.complete_match`: static whenever a param is built
    dtype = ir.DataType(match.elem_type)
    array = np.ascontiguousarray(np.broadcast_to(np.asarray(value).astype(dtype.numpy()), match.dims))
    key = (int(dtype), array.shape, array.tobytes())
    if key not in reusable:
        name = names.fresh(stem)
        reusable[key] = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                                 const_value=ir.tensor(array, name=name))
        created.append(reusable[key])
    return reusable[key]


def _fused_nodes(match: NormMatch, op_type: str, names: FreshNames,
                 reusable: dict[ParamKey, ir.Value]) -> tuple[list[ir.Node], list[ir.Value]]:
    stem = match.scope or match.output
    created: list[ir.Value] = []
    ones = match.scale is None and match.dims is None  # built from the input's shape, below
    inputs = [match.input, match.input if ones else _param(1.0 if match.scale is None else match.scale, match,
                                                            f"{stem}.scale", names, reusable, created)]
    if match.kind == "LayerNorm" and match.bias is not None:
        inputs.append(_param(match.bias, match, f"{stem}.bias", names, reusable, created))
    node_stem = "/" + stem.replace(".", "/") if match.scope else stem
    permutation = match.layout.permutation
    nodes = []
    if permutation is not None:
        nodes.append(_node("Transpose", [match.input], f"{node_stem}/Transpose", names, f"{stem}.to_last",
                           perm=permutation))
        inputs[0] = nodes[-1].outputs[0]
    if ones:
        nodes += _ones(inputs[0], match, node_stem, stem, names)
        inputs[1] = nodes[-1].outputs[0]
    nodes.append(_node(op_type, inputs, f"{node_stem}/{op_type}", names, f"{stem}.normalized_last",
                       axis=-len(match.layout.axes), epsilon=float(match.epsilon), stash_type=1))
    if permutation is not None:
        nodes.append(_node("Transpose", [nodes[-1].outputs[0]], f"{node_stem}/Transpose_back", names, match.output,
                           perm=[int(i) for i in np.argsort(permutation)]))
    for node in nodes:
        node.metadata_props[SCOPE_KEY] = match.scope
    return nodes, created


def _ones(source: ir.Value, match: NormMatch, node_stem: str, stem: str, names: FreshNames) -> list[ir.Node]:
    """A scale of ones over normalized dims known only when the graph runs: ConstantOfShape of
    the trailing dims of `source`'s Shape (opset 15's `start`: no Slice)."""
    one = ir.tensor(np.ones(1, ir.DataType(match.elem_type).numpy()))
    shape = _node("Shape", [source], f"{node_stem}/Shape", names, f"{stem}.normalized_shape",
                  start=-len(match.layout.axes))
    return [shape, _node("ConstantOfShape", [shape.outputs[0]], f"{node_stem}/ConstantOfShape", names,
                         f"{stem}.ones", value=one)]


def _node(op_type: str, inputs: list[ir.Value], name: str, names: FreshNames, output: str, **attributes) -> ir.Node:
    node = ir.node(op_type, inputs, attributes=attributes, name=names.fresh(name))
    node.outputs[0].name = names.fresh(output)
    return node
