"""A post-LN residual (an Add whose sum only a LayerNormalization reads, as in BERT) written over
(tokens x hidden) rows, for graphs meant for ONNX Runtime's CPU.

ONNX Runtime's extended optimizations, on by default, fuse a rank-3 Add that feeds one
LayerNormalization into SkipLayerNormalization. That op's float CPU kernel is a scalar loop:
measured 4.5x slower than Add + LayerNormalization on (8, 32, 768) and (1, 128, 768), about 6% of
a BERT-base run (ONNX Runtime 1.32, one thread). The fusion takes rank-3 Adds only, so the same
sum over `Flatten`ed rows stays two ops; `Flatten` and `Reshape` relabel the buffer, they copy
nothing. Pre-LN residuals (the sum read again by the next block) and RMSNorms are left: ONNX
Runtime fuses neither.
"""

import onnx
import onnx_ir as ir

from ticknorm.base.graph import FreshNames
from ticknorm.base.scopes import SCOPE_KEY
from ticknorm.base.write_back import rewritten
from ticknorm.exporter.fusion.skip import residual_add

_LAST = -1


def token_rows(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """`model` with each post-LN residual over token rows, and how many. Run after the norms'
    verification: what checks the result is the run of the whole graph against PyTorch."""
    return rewritten(model, lambda graph: rewrite_residuals(graph, FreshNames(graph, [])))


def rewrite_residuals(graph: ir.Graph, names: FreshNames) -> int:
    """Rewrite, in place, each LayerNormalization of a residual sum nothing else reads; returns
    how many. The norm keeps its node name, its output's name and its scope; the Flattens and
    the Add keep the Add's (a profile's rows stay on their modules)."""
    rewritten = 0
    for node in list(graph):
        add = _post_norm_residual(node)
        if add is None:
            continue
        first, second = add.inputs
        assert first is not None and second is not None  # `residual_add` checked them
        stem = node.name or "layer_norm"
        rows = [_named(ir.node("Flatten", [value], attributes={"axis": 2}), names, f"{stem}_rows")
                for value in (first, second)]
        total = _named(ir.node("Add", [rows[0].outputs[0], rows[1].outputs[0]]), names, f"{stem}_residual")
        attributes = {name: attr for name, attr in node.attributes.items() if name != "axis"}
        norm = ir.node("LayerNormalization", [total.outputs[0], *node.inputs[1:]],
                       attributes={**attributes, "axis": _LAST}, name=node.name)
        norm.outputs[0].name = names.fresh(f"{stem}_rows_normalized")
        shape = _named(ir.node("Shape", [first]), names, f"{stem}_shape")
        # allowzero: a dim of 0 (an empty sequence) is that size, not "copy the input's"
        back = ir.node("Reshape", [norm.outputs[0], shape.outputs[0]], attributes={"allowzero": 1},
                       name=names.fresh(f"{stem}_tokens"))
        sum_scope, norm_scope = (n.metadata_props.get(SCOPE_KEY, "") for n in (add, node))
        for new_node in (*rows, total):  # the sum stays its module's (the block's), as the Add was
            new_node.metadata_props[SCOPE_KEY] = sum_scope or norm_scope
        for new_node in (norm, shape, back):
            new_node.metadata_props[SCOPE_KEY] = norm_scope or sum_scope
        new_nodes = [*rows, total, norm, shape, back]
        ir.convenience.replace_nodes_and_values(graph, add, [add, node], new_nodes, [node.outputs[0]],
                                                [back.outputs[0]])
        rewritten += 1
    return rewritten


def _named(node: ir.Node, names: FreshNames, stem: str) -> ir.Node:
    """`node`, it and its one output named from `stem`: values a reader of the graph can place."""
    node.name = names.fresh(stem)
    node.outputs[0].name = names.fresh(stem)
    return node


def _post_norm_residual(node: ir.Node) -> ir.Node | None:
    """The Add ONNX Runtime would fuse with `node` into SkipLayerNormalization, or None: `node` a
    LayerNormalization of a rank-3 residual sum (`residual_add`) that it alone reads."""
    if node.op_type != "LayerNormalization":
        return None
    add = residual_add(node)
    if add is None or len(add.outputs[0].uses()) != 1 or add.outputs[0].is_graph_output():
        return None
    return add
