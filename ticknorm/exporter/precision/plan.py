"""Which nodes stay in fp32, and why: the rules of the precision policy applied to a measured fp32
run, in the spirit of ModelOpt AutoCast's data-magnitude rules, but with the type's own limits and
the statistics norms and reductions hold inside them.

A node computes in the low type unless one of these keeps it in fp32, first reason wins:
the user's `--keep-fp32` glob matches its module, node name or op type (see `keep`); it holds a
subgraph other than an If, Loop or Scan body (those are converted, see `bodies`) or sets a type
we do not lower; a float tensor it reads or writes exceeds the type's
range; a norm's variance or a reduction's running sum would; more than `underflow_limit` of an
output's nonzero values fall below the type's smallest normal; the ranges its norm module reached
in training (a ticks file, `--calibration`) passed the type's largest number."""

from dataclasses import replace

import onnx
import onnx_ir as ir

from ticknorm.base.graph import typed
from ticknorm.base.precision import LARGEST, Fp32Island, Precision
from ticknorm.base.scopes import node_scope
from ticknorm.exporter.precision.bodies import control_flow, planned_nodes
from ticknorm.exporter.precision.calibration import calibrated_nodes
from ticknorm.exporter.precision.keep import ROOT_ONLY, example_scopes, kept_by, refuse_unmatched
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
    view = typed(model)
    graph = view.graph
    refuse_unmatched(graph, precision.keep_fp32)
    recorded = calibrated_nodes(graph, precision, (example_scopes(graph) or [ROOT_ONLY])[0])
    measured = (measure(model, view, feeds, precision.dtype, weights_dir) if values is None
                else measurement(view, values, precision.dtype))
    islands = []
    for position, (node, name) in enumerate(planned_nodes(graph)):
        if not arithmetic(node):
            continue
        reason = _reason(node, name, position, measured, precision) or recorded.get(position, "")
        if reason:
            islands.append(Fp32Island(node_scope(node), name, reason))
    return replace(precision, islands=tuple(islands))


def arithmetic(node: ir.Node) -> bool:
    """Whether a node computes on float32 tensors (what a low precision changes). A control-flow
    node computes nothing itself: its bodies' nodes do, and its boundary stays fp32."""
    if node.op_type in NEUTRAL_OPS or control_flow(node):
        return False
    return any(value is not None and value.name and value.dtype == ir.DataType.FLOAT
               for value in (*node.inputs, *node.outputs))


def _reason(node: ir.Node, name: str, position: int, measured: Measurement,
            precision: Precision) -> str:
    dtype, largest = precision.dtype, LARGEST[precision.dtype]
    matched = kept_by(precision.keep_fp32, node, name)
    if matched:
        return matched
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        return "holds a subgraph (kept as exported)"
    typed_by = {"to", "dtype", "value"} & set(node.attributes)
    if typed_by and TYPED_BY_ATTRIBUTE.get(node.op_type) not in typed_by:
        return f"{node.op_type} sets its type by an attribute ticknorm does not lower"
    for role, values in (("input", node.inputs), ("output", node.outputs)):
        for value in (value for value in values if value is not None and value.name):
            found = measured.tensors.get(value.name or "")
            if found is not None and found.absmax > largest:
                what = "weight" if value.is_initializer() else role
                return f"{what} {value.name} reaches {found.absmax:.4g} > {dtype} max {largest:g}"
    what, statistic = measured.statistics.get(position, ("", 0.0))
    if statistic > largest:
        return f"{what} reaches {statistic:.4g} > {dtype} max {largest:g}"
    for output in (value.name for value in node.outputs if value.name):
        found = measured.tensors.get(output)
        if found is not None and found.underflow > precision.underflow_limit:
            return f"{found.underflow:.1%} of {output}'s nonzero values underflow {dtype}"
    return ""

