"""ONNX's RotaryEmbedding (opset 23) with caches the shape the standard asks for.

Without `position_ids`, the standard gives `cos_cache` and `sin_cache` the shape
(batch_size, sequence_length, rotary_dim / 2). torch.onnx's dynamo exporter writes them with a
batch of 1 that broadcasts (Llama's and Qwen2's rotary embedding computes them from one row of
positions), and ONNX Runtime 1.32 refuses that at run time ("Inputs 'cos_cache' and 'sin_cache'
are expected to have the same shape as input 'x', got 1 and ..."). Each such cache is expanded to
x's batch: the graph then runs, computes the same numbers, and keeps the one standard op.
"""

import onnx
from onnx import helper

from ticknorm.base.graph import UniqueNames

ROTARY = "RotaryEmbedding"


def expand_rotary_caches(model: onnx.ModelProto) -> int:
    """Expand the caches of every RotaryEmbedding without position_ids to x's batch, in place;
    returns how many nodes were changed. Each new node carries its RotaryEmbedding's metadata
    (its module scope), so profiles and per-module checks still map it."""
    graph = model.graph
    names = UniqueNames(model)
    rebuilt, changed = [], 0
    for node in graph.node:
        if node.op_type == ROTARY and node.domain in ("", "ai.onnx") and len([i for i in node.input if i]) == 3:
            x, cos, sin = node.input[:3]
            batch, rest, shape = names.fresh(f"{node.name}_batch"), names.fresh(f"{node.name}_rest"), names.fresh(f"{node.name}_cache_shape")
            added = [helper.make_node("Shape", [x], [batch], start=0, end=1),
                     helper.make_node("Shape", [cos], [rest], start=1),
                     helper.make_node("Concat", [batch, rest], [shape], axis=0)]
            for index, cache in ((1, cos), (2, sin)):
                expanded = names.fresh(f"{cache}_per_batch")
                added.append(helper.make_node("Expand", [cache, shape], [expanded]))
                node.input[index] = expanded
            for new in added:
                new.name = names.fresh(f"{node.name}_{new.op_type}")
                new.metadata_props.extend(node.metadata_props)
            rebuilt += added
            changed += 1
        rebuilt.append(node)
    if changed:
        del graph.node[:]
        graph.node.extend(rebuilt)
    return changed
