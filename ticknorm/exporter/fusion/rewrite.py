"""Replace matched normalizations by single nodes, keeping names, order and module scopes."""

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ticknorm.base.graph import GraphIndex, UniqueNames, rebuilt
from ticknorm.exporter.fusion.norms import NormMatch
from ticknorm.base.scopes import set_scope
from ticknorm.base.onnx_io import is_external

# The op each kind becomes, and the first default-domain opset that has it.
FUSED_OPS = {"LayerNorm": ("LayerNormalization", 17), "RMSNorm": ("RMSNormalization", 23)}
# ONNX Runtime's own fused RMSNorm, registered in the default domain at every opset: what its
# optimizer and the GenAI model builder write. Runtimes other than ONNX Runtime do not take it.
ORT_RMS_NORM = "SimplifiedLayerNormalization"
# auto: RMSNormalization at opset 23+, ONNX Runtime's op below; onnx: RMSNormalization only (left
# decomposed below 23); ort: ONNX Runtime's op at any opset.
RMS_TARGETS = ("auto", "onnx", "ort")


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


def rewrite_matches(model: onnx.ModelProto, index: GraphIndex, matches: list[NormMatch],
                    op_types: dict[str, str]) -> onnx.ModelProto:
    """A new model where each match is one fused node (of `op_types[kind]`) placed where its last
    node was."""
    names = UniqueNames(model)
    reusable = _reusable_params(index, matches)
    replacement, removed, new_initializers = {}, set(), []
    for match in matches:
        nodes, params = _fused_nodes(match, op_types[match.kind], names, reusable)
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
        if tuple(tensor.dims) in shapes and name not in index.graph_inputs and not is_external(tensor):
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


def _fused_nodes(match: NormMatch, op_type: str, names: UniqueNames, reusable: dict) -> tuple[list, list]:
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
