"""The nodes a precision plan covers: the graph's own and those of its If, Loop and Scan bodies.

A VAD model's If, or Optimum's merged decoder (an If holding the whole decoder in both branches,
reading the outer graph's weights), holds the network in a body: a plan of the outer graph alone
converts none of it. A body's boundary stays fp32 (its inputs, its outputs, and the control-flow
node's inputs and outputs), so both branches of an If declare the same output types and a Loop
carries its state in the type it came in; everything inside computes in the low type like any
other node. Bodies of other ops (contrib ops such as BeamSearch) are theirs: those stay as
exported."""

import onnx_ir as ir

from ticknorm.base.graph import node_name

CONTROL_FLOW = ("If", "Loop", "Scan")


def control_flow(node: ir.Node) -> bool:
    """Whether `node` is an ONNX If, Loop or Scan, whose bodies the plan converts."""
    return node.op_type in CONTROL_FLOW and node.domain in ("", "ai.onnx")


def planned_nodes(graph: ir.Graph) -> list[tuple[ir.Node, str]]:
    """Every node of `graph` and of its control-flow bodies at any depth, each body right after
    the node holding it (the order is the same in each onnx-ir copy of one model: the index is how
    the plan and the graphs written from it name a node), with the name reports give it: its own,
    else its op type and position, prefixed in a body by the node and attribute holding it
    (`If_0.then_branch/Mul#2`)."""
    found: list[tuple[ir.Node, str]] = []
    _collect(graph, "", found)
    return found


def planned_graphs(graph: ir.Graph) -> list[ir.Graph]:
    """`graph` and its control-flow bodies at any depth."""
    found = [graph]
    for node, _ in planned_nodes(graph):
        if control_flow(node):
            found += [body for _, body in _subgraphs(node)]
    return found


def body_outputs(node: ir.Node) -> list[ir.Value]:
    """The outputs of a control-flow node's bodies (what its outputs are computed from); [] for any
    other node."""
    if not control_flow(node):
        return []
    return [value for _, body in _subgraphs(node) for value in body.outputs]


def _collect(graph: ir.Graph, owner: str, found: list[tuple[ir.Node, str]]) -> None:
    for position, node in enumerate(graph):
        name = node.name or f"{owner}{node_name(node, position)}"
        found.append((node, name))
        if control_flow(node):
            for attribute, body in _subgraphs(node):
                _collect(body, f"{name}.{attribute}/", found)


def _subgraphs(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    return [(a.name, a.value) for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]
