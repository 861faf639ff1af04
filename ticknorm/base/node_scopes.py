"""Nodes as the rows of a file that names no module: a file judged or timed alone, with no PyTorch
model to name modules, and no scope its exporter left, still says where it goes wrong or slow,
by node. Each computing node becomes a scope of its own (its name, '.' read as '_' so that no
node sits inside another; an unnamed one `Op#position`), so every tap, table and trace that works
per module works per node unchanged."""

import onnx

from ticknorm.base.graph import all_nodes
from ticknorm.base.scopes import NON_COMPUTING, module_output_tensors, set_scope


def node_row(node: onnx.NodeProto, position: int) -> str:
    """The scope a node is its own row under."""
    return (node.name or f"{node.op_type}#{position}").replace(".", "_")


def by_node_where_unscoped(model: onnx.ModelProto) -> bool:
    """Give `model` (scopes ensured) one scope per computing node where its scopes name no module
    below the root; constants and identities stay on the root. Whether it did."""
    if module_output_tensors(model):
        return False
    for position, node in enumerate(all_nodes(model.graph)):
        set_scope(node, "" if node.op_type in NON_COMPUTING else node_row(node, position))
    return True
