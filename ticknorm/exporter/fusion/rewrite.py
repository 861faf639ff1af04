"""Replace matched normalizations by single nodes, keeping names, order and module scopes."""

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ticknorm.exporter.fusion.graph import GraphIndex, rebuilt
from ticknorm.exporter.fusion.norms import NormMatch
from ticknorm.exporter.scopes import set_scope

# The op each kind becomes, and the first default-domain opset that has it.
FUSED_OPS = {"LayerNorm": ("LayerNormalization", 17), "RMSNorm": ("RMSNormalization", 23)}


class UniqueNames:
    """Unique tensor and node names, from a counter (as onnx-graphsurgeon does)."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
        for node in graph.node:
            self.taken.update(node.output)
            self.taken.add(node.name)

    def fresh(self, stem: str) -> str:
        name, count = stem, 0
        while name in self.taken:
            count += 1
            name = f"{stem}_{count}"
        self.taken.add(name)
        return name


def rewrite_matches(model: onnx.ModelProto, index: GraphIndex, matches: list[NormMatch]) -> onnx.ModelProto:
    """A new model where each match is one fused node placed where its last node was."""
    names = UniqueNames(model)
    reusable = _reusable_params(index, matches)
    replacement, removed, new_initializers = {}, set(), []
    for match in matches:
        nodes, params = _fused_nodes(match, names, reusable)
        replacement[max(match.nodes)] = nodes
        removed.update(match.nodes)
        new_initializers.extend(params)
    kept_nodes = []
    for position, node in enumerate(index.nodes):
        if position in replacement:
            kept_nodes.extend(replacement[position])
        elif position not in removed:
            kept_nodes.append(node)
    read = {name for node in kept_nodes for name in node.input} | index.graph_outputs
    initializers = [t for t in model.graph.initializer if t.name in read or t.name in index.graph_inputs]
    return rebuilt(model, kept_nodes, initializers + new_initializers)


def _reusable_params(index: GraphIndex, matches: list[NormMatch]) -> dict:
    """Existing initializers a fused node can point to instead of storing a copy."""
    shapes = {tuple(m.layout.dims) for m in matches}
    found = {}
    for name, tensor in index.initializers.items():
        if tuple(tensor.dims) in shapes and name not in index.graph_inputs:
            array = numpy_helper.to_array(tensor)
            found.setdefault((array.dtype.str, array.shape, array.tobytes()), name)
    return found


def _param(value, match: NormMatch, stem: str, names: UniqueNames, reusable: dict, created: list) -> str:
    dtype = helper.tensor_dtype_to_np_dtype(match.elem_type)
    array = np.ascontiguousarray(np.broadcast_to(np.asarray(value).astype(dtype), match.layout.dims))
    key = (array.dtype.str, array.shape, array.tobytes())
    if key not in reusable:
        reusable[key] = names.fresh(stem)
        created.append(numpy_helper.from_array(array, reusable[key]))
    return reusable[key]


def _fused_nodes(match: NormMatch, names: UniqueNames, reusable: dict) -> tuple[list, list]:
    op_type, _ = FUSED_OPS[match.kind]
    stem = match.scope or match.output
    created: list = []
    inputs = [match.input, _param(1.0 if match.scale is None else match.scale, match, f"{stem}.scale", names, reusable, created)]
    if match.kind == "LayerNorm" and match.bias is not None:
        inputs.append(_param(match.bias, match, f"{stem}.bias", names, reusable, created))
    node_stem = "/" + stem.replace(".", "/") if match.scope else stem
    permutation = match.layout.permutation
    core_in, core_out = inputs[0], match.output
    nodes = []
    if permutation is not None:
        core_in, core_out = names.fresh(f"{stem}.to_last"), names.fresh(f"{stem}.normalized_last")
        nodes.append(helper.make_node("Transpose", [match.input], [core_in], names.fresh(f"{node_stem}/Transpose"), perm=permutation))
    nodes.append(helper.make_node(op_type, [core_in] + inputs[1:], [core_out], names.fresh(f"{node_stem}/{op_type}"),
                                  axis=-len(match.layout.axes), epsilon=match.epsilon, stash_type=1))
    if permutation is not None:
        inverse = [int(i) for i in np.argsort(permutation)]
        nodes.append(helper.make_node("Transpose", [core_out], [match.output], names.fresh(f"{node_stem}/Transpose_back"), perm=inverse))
    for node in nodes:
        set_scope(node, match.scope)
    return nodes, created
