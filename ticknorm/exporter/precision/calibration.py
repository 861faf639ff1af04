"""The ranges a model's norms reached while it trained (a ticks file, `--calibration`) as a rule
of the precision plan. The export's example inputs (random token ids) are not the data the model
was fine-tuned on; a norm whose recorded input, output or mean of squares passed the low type's
largest number on that data keeps every node of its module in fp32."""

from pathlib import Path

import onnx_ir as ir

from ticknorm.base.precision import LARGEST, Precision
from ticknorm.base.scopes import node_scope
from ticknorm.exporter.precision.bodies import planned_nodes
from ticknorm.ticks.log import read_ticks
from ticknorm.ticks.ranges import module_ranges, present_ranges


def calibrated_nodes(graph: ir.Graph, precision: Precision, example: str) -> dict[int, str]:
    """Node index (in `planned_nodes`) -> why the recorded ranges keep it in fp32 (nothing without a calibration).
    `example` is a module scope of the graph, for the refusal of a file recorded on another model."""
    if precision.calibration is None:
        return {}
    source = Path(precision.calibration).name
    scopes = [node_scope(node) for node, _ in planned_nodes(graph)]
    ranges = present_ranges(module_ranges(read_ticks(precision.calibration)),
                            lambda module: any(_inside(scope, module) for scope in scopes), source, example)
    largest = LARGEST[precision.dtype]
    reasons = {}
    for found in ranges:
        overflow = found.overflow(precision.dtype)
        if overflow is None:
            continue
        what, step, peak = overflow
        reason = (f"{what} reached {peak:.4g} > {precision.dtype} max {largest:g} in training (from step {step}, "
                  f"--calibration {source})")
        reasons.update({position: reason for position, scope in enumerate(scopes) if _inside(scope, found.module)})
    return reasons


def _inside(scope: str, module: str) -> bool:
    return scope == module or scope.startswith(module + ".")
