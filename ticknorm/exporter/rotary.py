"""ONNX's RotaryEmbedding (opset 23) with caches the shape the standard asks for.

Without `position_ids`, the standard gives `cos_cache` and `sin_cache` the shape
(batch_size, sequence_length, rotary_dim / 2). torch.onnx's dynamo exporter writes them with a
batch of 1 that broadcasts (Llama's and Qwen2's rotary embedding computes them from one row of
positions), and ONNX Runtime 1.32 refuses that at run time ("Inputs 'cos_cache' and 'sin_cache'
are expected to have the same shape as input 'x', got 1 and ..."). Each such cache is expanded to
x's batch: the graph then runs, computes the same numbers, and keeps the one standard op.
"""

from collections.abc import Sequence

import onnx
import onnx_ir as ir

ROTARY = "RotaryEmbedding"


def expand_rotary_caches(model: onnx.ModelProto) -> int:
    """Expand the caches of every RotaryEmbedding without position_ids to x's batch, in place;
    returns how many nodes were changed. Each new node carries its RotaryEmbedding's metadata
    (its module scope), so profiles and per-module checks still map it; onnx-ir names them."""
    edited = ir.from_proto(model)  # the weights stay where they are: a staged graph holds references
    rotaries = [node for node in edited.graph if node.op_type == ROTARY and node.domain in ("", "ai.onnx")
                and len([value for value in node.inputs if value is not None]) == 3]
    for node in rotaries:
        edited.graph.insert_before(node, _expanded_caches(node))
    if rotaries:
        model.CopyFrom(ir.to_proto(edited))
    return len(rotaries)


def _expanded_caches(node: ir.Node) -> Sequence[ir.Node]:
    """The nodes that expand `node`'s cos and sin caches to x's batch, on its metadata; `node`
    reads the expanded caches from then on."""
    tape = ir.tape.Tape()

    def op(op_type, inputs, attributes=None):
        return tape.op(op_type, inputs, attributes, metadata_props=dict(node.metadata_props))

    x, cos, sin = node.inputs[:3]
    shape = op("Concat", [op("Shape", [x], {"start": 0, "end": 1}), op("Shape", [cos], {"start": 1})], {"axis": 0})
    for index, cache in ((1, cos), (2, sin)):
        node.replace_input_with(index, op("Expand", [cache, shape]))
    return tape.nodes
