"""Which nodes stay in fp32, and why: the rules of the precision policy applied to a measured fp32
run, in the spirit of ModelOpt AutoCast's data-magnitude rules, but with the type's own limits and
the statistics norms and reductions hold inside them.

A node computes in the low type unless one of these keeps it in fp32, first reason wins:
the user's `--keep-fp32` glob matches its module; it holds a subgraph or sets a type we do not
lower; a float tensor it reads or writes exceeds the type's range; a norm's variance or a
reduction's running sum would; more than `underflow_limit` of an output's nonzero values fall
below the type's smallest normal; the ranges its norm module reached in training (a ticks file,
`--calibration`) passed the type's largest number."""

import fnmatch
from dataclasses import replace

import onnx

from ticknorm.base.errors import InputSpecError
from ticknorm.base.graph import GraphIndex
from ticknorm.base.precision import LARGEST, Fp32Island, Precision
from ticknorm.base.scopes import get_scope
from ticknorm.exporter.precision.calibration import calibrated_nodes
from ticknorm.exporter.precision.measure import Measurement, measure, measurement

# Ops whose float tensors are nobody's arithmetic: they take a tensor in whatever type it comes.
NEUTRAL_OPS = ("Shape", "Size")
# Nodes whose type comes from an attribute; those listed here are lowered by rewriting it.
TYPED_BY_ATTRIBUTE = {"Cast": "to", "Constant": "value", "ConstantOfShape": "value"}


def plan_precision(model: onnx.ModelProto, feeds: dict, precision: Precision, weights_dir=None,
                   values: dict | None = None) -> Precision:
    """`precision` with its fp32 islands measured on `feeds`, or on `values` (every float tensor of
    an fp32 run the caller made: a graph too large for one session, run piece by piece)."""
    if not precision.low:
        return precision
    index = GraphIndex(model)
    unmatched = [glob for glob in precision.keep_fp32
                 if not any(fnmatch.fnmatchcase(get_scope(node) or "", glob) for node in index.nodes)]
    if unmatched:
        raise InputSpecError(f"--keep-fp32 '{unmatched[0]}' matches no module of the graph (modules look like "
                             f"'{_example_scope(index)}')")
    recorded = calibrated_nodes(index, precision, _example_scope(index))
    measured = (measure(index, feeds, precision.dtype, weights_dir) if values is None
                else measurement(index, values, precision.dtype))
    islands = []
    for position, node in enumerate(index.nodes):
        if not arithmetic(index, node):
            continue
        reason = _reason(index, position, measured, precision) or recorded.get(position, "")
        if reason:
            islands.append(Fp32Island(get_scope(node) or "", index.node_name(position), reason))
    return replace(precision, islands=tuple(islands))


def arithmetic(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether a node computes on float32 tensors (what a low precision changes)."""
    if node.op_type in NEUTRAL_OPS:
        return False
    return any(index.elem_type(name) == onnx.TensorProto.FLOAT for name in (*node.input, *node.output) if name)


def _reason(index: GraphIndex, position: int, measured: Measurement, precision: Precision) -> str:
    node, dtype, largest = index.nodes[position], precision.dtype, LARGEST[precision.dtype]
    scope = get_scope(node) or ""
    matched = next((glob for glob in precision.keep_fp32 if fnmatch.fnmatchcase(scope, glob)), None)
    if matched:
        return f"--keep-fp32 {matched}"
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return "holds a subgraph (kept as exported)"
    typed = {"to", "dtype", "value"} & {a.name for a in node.attribute}
    if typed and TYPED_BY_ATTRIBUTE.get(node.op_type) not in typed:
        return f"{node.op_type} sets its type by an attribute ticknorm does not lower"
    for role, names in (("input", node.input), ("output", node.output)):
        for name in names:
            found = measured.tensors.get(name)
            if found is not None and found.absmax > largest:
                what = "weight" if name in index.initializers else role
                return f"{what} {name} reaches {found.absmax:.4g} > {dtype} max {largest:g}"
    what, value = measured.statistics.get(position, ("", 0.0))
    if value > largest:
        return f"{what} reaches {value:.4g} > {dtype} max {largest:g}"
    for name in node.output:
        found = measured.tensors.get(name)
        if found is not None and found.underflow > precision.underflow_limit:
            return f"{found.underflow:.1%} of {name}'s nonzero values underflow {dtype}"
    return ""


def _example_scope(index: GraphIndex) -> str:
    scopes = sorted({get_scope(node) or "" for node in index.nodes} - {""}, key=lambda s: (-s.count("."), s))
    return scopes[0] if scopes else "(only the root module)"
