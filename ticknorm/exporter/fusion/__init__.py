"""Rewrite every decomposed LayerNorm (and RMSNorm, where the opset has it) into one node."""

from dataclasses import dataclass

import numpy as np
import onnx

from ticknorm.base.errors import AccuracyError, FusionError, InputSpecError, RuntimeFailure, first_line
from ticknorm.base.functions import called_functions, inline_functions
from ticknorm.base.graph import GraphIndex, bodies
from ticknorm.exporter.fusion.layer_norm import find_layer_norms
from ticknorm.exporter.fusion.norms import NormMatch
from ticknorm.exporter.fusion.patterns import forward_means
from ticknorm.exporter.fusion.report import FusionReport, NormRecord
from ticknorm.exporter.fusion.rewrite import FUSED_OPS, RMS_TARGETS, NormTargets, rewrite_matches
from ticknorm.exporter.fusion.rms_norm import find_rms_norms
from ticknorm.exporter.fusion.subgraphs import body_model, put_back
from ticknorm.exporter.fusion.verify import verify_fused
from ticknorm.base.scopes import annotate_scopes, get_scope, set_scope
from ticknorm.base.graph_feeds import feed_sets_for_graph, guessed_inputs

__all__ = ["FusionResult", "FusionReport", "NormTargets", "RMS_TARGETS", "find_norms", "fuse_norms"]


@dataclass
class FusionResult:
    model: onnx.ModelProto
    report: FusionReport
    outputs: list | None = None  # the verified graph's outputs on the feeds, then on each of `also`


def fuse_norms(model: onnx.ModelProto, opset: int | None = None, verify: bool = True,
               feeds: dict[str, np.ndarray] | None = None, targets: NormTargets = NormTargets(),
               weights_dir=None, also=()) -> FusionResult:
    """Fuse, verify against the original in ONNX Runtime, and report. Raises AccuracyError (and
    returns nothing) when a fused graph computes different numbers.

    `opset` is the opset the result may use; by default the model's own, raised to 17 when a
    LayerNorm needs it. An `opset` below 17 keeps LayerNorms decomposed, and reports them. RMSNorms
    become RMSNormalization at opset 23+ and ONNX Runtime's SimplifiedLayerNormalization below
    (`targets.rms`, see `rewrite.RMS_TARGETS`). `weights_dir` holds the weights of a model staged
    on disk (`onnx_io.stage_weights`), which verification sessions map from there. The fused
    graph's verification session also runs each feed dict of `also`; `outputs` holds what it
    computed (None when nothing was verified).
    """
    if targets.rms not in RMS_TARGETS:
        raise FusionError(f"unknown RMSNorm target '{targets.rms}'; choose one of: {', '.join(RMS_TARGETS)}")
    model, inlined = _norms_reachable(model)
    index = GraphIndex(model)
    before = index.opset
    if opset is not None and opset < before:
        raise FusionError(f"--opset {opset} is below the model's opset {before}; fusion never lowers an opset")
    found = find_norms(index)
    target = _target_opset(found, before, opset, targets)
    working = model
    if target != before:
        working = _convert(model, target)
        index = GraphIndex(working)
        found = find_norms(index)
    op_types = {kind: targets.op(kind, target)[0] for kind in FUSED_OPS}
    records, matches = _records(found, target, targets)
    fused = rewrite_matches(working, index, matches, op_types) if matches else working
    fused, inner = _fuse_bodies(fused, model, target, targets, op_types)
    report = FusionReport(before, target, records + inner, inlined=inlined)
    outputs = None
    if verify and (matches or any(record.status == "fused" for record in inner)):
        derived = feeds is None
        if derived:  # from the graph: for a decoder with a KV cache a decode step, then a prefill too
            feeds, *more = feed_sets_for_graph(model)
            also = [*more, *also]
        try:
            outputs = _verify(model, fused, matches, records, feeds, weights_dir, also)
        except RuntimeFailure as exc:
            if not derived:
                raise
            raise InputSpecError(f"the feeds derived from the graph do not fit it ({exc}); give the inputs it takes with "
                                 f"--input NAME:DIMS[:DTYPE] (guessed here: {', '.join(guessed_inputs(model))})") from exc
        report.verified = True
    return FusionResult(fused, report, outputs)


def _norms_reachable(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """`model`, or, when norms sit inside its local functions, the model with those calls inlined
    (`base.functions`) and which functions were, by call count."""
    inlined = inline_functions(model)
    if inlined is None or len(find_norms(GraphIndex(inlined))) <= len(find_norms(GraphIndex(model))):
        return model, {}
    return inlined, called_functions(model)


def _fuse_bodies(fused: onnx.ModelProto, original: onnx.ModelProto, target: int, targets: NormTargets,
                 op_types: dict) -> tuple[onnx.ModelProto, list]:
    """The norms inside If/Loop/Scan bodies, fused in place (in a copy while `fused` is still the
    caller's model), and their records."""
    if not bodies(fused.graph):
        return fused, []
    if fused is original:  # the bodies are rewritten in place: never in the caller's model
        fused = onnx.ModelProto()
        fused.CopyFrom(original)
    outer = GraphIndex(fused)
    records = []
    for holder, body in bodies(fused.graph):  # the copy's bodies, listed after the copy
        wrapper = body_model(fused, body, outer)
        index = GraphIndex(wrapper)
        found, matches = _records(find_norms(index), target, targets)
        for record in found:
            record.notes.append(f"inside {holder.op_type} '{holder.name}': checked through the graph's outputs")
        if matches:
            put_back(body, rewrite_matches(wrapper, index, matches, op_types).graph, outer)
        records += found
    return fused, records


def find_norms(index: GraphIndex) -> list:
    """Every decomposed LayerNorm and RMSNorm: NormMatch when fusable, NormRefusal otherwise."""
    return find_layer_norms(index) + find_rms_norms(index, _centered_tensors(index))


def _centered_tensors(index: GraphIndex) -> set:
    """x - mean(x) tensors, fused or not: an RMS tail on one of them is a LayerNorm's tail."""
    centered = set()
    for node in index.nodes:
        if node.op_type == "Sub":
            means = forward_means(index, node.input[0])
            if any(m.output == node.input[1] for m in means):
                centered.add(node.output[0])
    return centered


def _target_opset(found: list, before: int, requested: int | None, targets: NormTargets) -> int:
    """The opset asked for (below 17 the LayerNorms stay decomposed, reported as left), else the
    model's own raised to what its LayerNorms need; never raised for RMSNorms (they have a
    target at every opset)."""
    if requested is not None:
        newest = onnx.defs.onnx_opset_version()
        if not 7 <= requested <= newest:
            raise FusionError(f"--opset {requested} is not one this onnx {onnx.__version__} can convert to (7 to {newest})")
        return requested
    needs = [targets.op(m.kind, before)[1] for m in found if isinstance(m, NormMatch) and m.kind == "LayerNorm"]
    return max([before] + needs)


def _convert(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """The model at opset `target`. The converter drops node metadata: scopes are copied back by
    node name, and nodes it created borrow theirs from their neighbours."""
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise FusionError(f"cannot raise the model to opset {target}: {first_line(exc)}") from exc
    scopes = {node.name: get_scope(node) for node in model.graph.node if node.name and get_scope(node) is not None}
    for node in converted.graph.node:
        if node.name in scopes:
            set_scope(node, scopes[node.name])
    if scopes:
        annotate_scopes(converted)
    return converted


def _records(found: list, target: int, targets: NormTargets) -> tuple[list, list]:
    records, matches = [], []
    for item in found:
        if not isinstance(item, NormMatch):
            records.append(NormRecord(item.kind, item.scope, "refused", item.reason, item.node))
            continue
        op_type, needs = targets.op(item.kind, target)
        record = NormRecord(item.kind, item.scope, "fused", "", item.anchor, item.output, item.epsilon, item.notes,
                            op=op_type)
        if target < needs:
            record.status = "left"
            record.reason = (f"{op_type} needs opset {needs}, the target is {target} (fuse with --opset {needs}"
                             + (", or export with --ln-target plugin)" if item.kind == "LayerNorm" else ")"))
        else:
            matches.append(item)
        records.append(record)
    return records, matches


def _verify(original, fused, matches: list[NormMatch], records: list, feeds, weights_dir, also) -> list:
    verification = verify_fused(original, fused, {m.output: m.elem_type for m in matches}, feeds, weights_dir, also)
    checks = verification.checks
    by_output = {r.output: r for r in records if r.status == "fused"}
    for name, check in checks.items():
        if name in by_output:
            by_output[name].max_abs_error = check.max_abs
    failed = [c for c in checks.values() if not c.passed]
    if failed:
        where = by_output.get(failed[0].name)
        what = f"{where.kind} {where.scope or where.node}" if where else f"output '{failed[0].name}'"
        raise AccuracyError(f"fusion changed the numbers of {what}: {failed[0].reason}; nothing was written")
    return verification.outputs
