"""`--keep-fp32 GLOB`: the nodes a user keeps in fp32, and the glob to suggest when a conversion drifts.

A glob matches a node's module scope (`encoder.layer.*.output`) or, for graphs no PyTorch exporter
wrote (Paddle2ONNX's `p2o.MatMul.3`, tf2onnx's `model/dense_1/MatMul`: no modules but the root),
its ONNX node name; `op:GLOB` matches op types (`op:Softmax`). The prefix is spelled out because no
module path or exporter's node name carries it, so a bare glob can never keep every node of a type
by accident, nor `op:` a node that only happens to be named like an op."""

import fnmatch
import re
import shlex
from collections import Counter

import onnx_ir as ir

from ticknorm.base.errors import InputSpecError
from ticknorm.base.scopes import node_scope
from ticknorm.exporter.precision.bodies import body_outputs, planned_nodes

OP_PREFIX = "op:"
ROOT_ONLY = "(only the root module)"  # what a graph without module scopes shows for its modules
_SHOWN = 3  # how many modules, node names and op types a refusal lists


def matched_key(glob: str, node: ir.Node, name: str) -> str | None:
    """Which of the node's keys `glob` matches ("module", "node name", "op type"), or None
    (`name`: the node's name as `planned_nodes` gives it)."""
    if glob.startswith(OP_PREFIX):
        return "op type" if fnmatch.fnmatchcase(node.op_type, glob[len(OP_PREFIX):]) else None
    if fnmatch.fnmatchcase(node_scope(node), glob):
        return "module"
    return "node name" if fnmatch.fnmatchcase(name, glob) else None


def kept_by(globs: tuple[str, ...], node: ir.Node, name: str) -> str:
    """Why the user keeps the node in fp32 ('' when no glob matches): the glob, and the key it
    matched unless it is the module (which the island's line already leads with)."""
    for glob in globs:
        key = matched_key(glob, node, name)
        if key:
            return f"--keep-fp32 {glob}" + ("" if key == "module" else f" ({key})")
    return ""


def refuse_unmatched(graph: ir.Graph, globs: tuple[str, ...]) -> None:
    """A glob that keeps nothing is a typo or a glob for another graph: refuse it, listing what exists."""
    nodes = planned_nodes(graph)
    for glob in globs:
        if not any(matched_key(glob, node, name) for node, name in nodes):
            raise InputSpecError(f"--keep-fp32 '{glob}' matches no module of the graph, no node name, nor (as "
                                 f"{OP_PREFIX}GLOB) an op type: {existing(graph)}")


def existing(graph: ir.Graph) -> str:
    scopes = example_scopes(graph)
    names = [name for _, name in planned_nodes(graph)][:_SHOWN]
    types = [f"{OP_PREFIX}{op}" for op, _ in Counter(node.op_type for node in graph).most_common(_SHOWN)]
    return (f"modules look like {_listed(scopes) or ROOT_ONLY}, node names like {_listed(names)}, "
            f"op types like {_listed(types)}")


def example_scopes(graph: ir.Graph) -> list[str]:
    """The graph's deepest module scopes first (what a user's glob most likely aims at)."""
    return sorted({node_scope(node) for node in graph} - {""}, key=lambda s: (-s.count("."), s))[:_SHOWN]


def suggestion(graph: ir.Graph, low_nodes: set[int], output: str) -> str:
    """`--keep-fp32` globs for the low-precision node nearest upstream of `output` (its module, or
    its node name on a graph without modules, and its op type), each matching a node of `graph`;
    '' when no low node feeds it. `low_nodes` are indices into `planned_nodes`; the search goes on
    through a control-flow node into its bodies' outputs."""
    planned = planned_nodes(graph)
    positions = {node: position for position, (node, _) in enumerate(planned)}
    pending = [value for value in graph.outputs if value.name == output]
    seen: set[ir.Node] = set()
    while pending:
        node = pending.pop(0).producer()
        if node is None or node in seen or node not in positions:
            continue
        seen.add(node)
        if positions[node] in low_nodes:
            glob = node_scope(node) or _escaped(planned[positions[node]][1])
            return (f"--keep-fp32 {shlex.quote(glob)} (the last low-precision node before {output}) or "
                    f"--keep-fp32 {OP_PREFIX}{node.op_type} (every {node.op_type})")
        pending += body_outputs(node) + [value for value in node.inputs if value is not None]
    return ""


def _escaped(name: str) -> str:
    """A glob that matches `name` alone, though it holds `*`, `?` or `[`."""
    return re.sub(r"([*?[])", r"[\1]", name)


def _listed(items: list[str]) -> str:
    return ", ".join(f"'{item}'" for item in items)
