"""Rewrite every decomposed LayerNorm (and RMSNorm, where the opset has it) into one node."""

import contextlib
import gc
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedOpsetsPass

from ticknorm.base.errors import AccuracyError, FusionError, InputSpecError, RuntimeFailure, first_line
from ticknorm.base.functions import called_functions, inline_functions
from ticknorm.base.graph import FreshNames, coarsest_floats, default_opset, nested_graphs
from ticknorm.base.graph_feeds import feed_sets_for_graph, guessed_inputs
from ticknorm.base.scopes import annotate_scopes, get_scope, set_scope
from ticknorm.base.write_back import written_back
from ticknorm.exporter.fusion.norms import Finding, NormMatch
from ticknorm.exporter.fusion.report import ORIGINAL_RUN_IN, FusionReport, NormRecord
from ticknorm.exporter.fusion.rewrite import FUSED_OPS, RMS_TARGETS, NormTargets, reusable_params, rewrite_matches
from ticknorm.exporter.fusion.rules import find_norms
from ticknorm.exporter.fusion.typed import typed_ir, typed_read
from ticknorm.exporter.fusion.values import elem_type
from ticknorm.exporter.fusion.verify import Checked, verify_fused

__all__ = ["FusionResult", "FusionReport", "NormTargets", "RMS_TARGETS", "find_norms", "fuse_norms", "norms_in",
           "typed_ir"]

# A graph's norms: (the node holding the graph, None for the main one; the graph; its norms).
GraphNorms = tuple[ir.Node | None, ir.Graph, list[Finding]]


@dataclass
class FusionResult:
    model: onnx.ModelProto
    report: FusionReport
    outputs: list[dict[str, np.ndarray]] | None = None  # the verified graph's, on the feeds then on each of `also`


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
    fused, report, matches, floats = _fused(model, opset, targets, judged=verify, weights_dir=weights_dir)
    report.inlined, records = inlined, report.records
    outputs = None
    if verify and any(r.status == "fused" for r in records):
        derived = feeds is None
        if derived:  # from the graph: for a decoder with a KV cache a decode step, then a prefill too
            feeds, *more = feed_sets_for_graph(model)
            also = [*more, *also]
        try:
            outputs = _verify(model, fused, matches, records, feeds, weights_dir, also, floats)
        except RuntimeFailure as exc:
            if not derived:
                raise
            guessed = ", ".join(guessed_inputs(model))
            raise InputSpecError(f"the feeds derived from the graph do not fit it ({exc}); give the inputs it takes "
                                 f"with --input NAME:DIMS[:DTYPE] (guessed here: {guessed})") from exc
        report.verified = True
    return FusionResult(fused, report, outputs)


@contextlib.contextmanager
def _collector_paused():
    """The onnx-ir graph is ~20 Python objects a node, linked in cycles, that all die when fusion
    returns. With the collector running, allocating them sets off full collections of the whole
    process (torch's heap included) that free nothing: a third of fusing a 96-layer encoder.
    Paused, they stay young, and the first collection after frees them in one pass."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@_collector_paused()
def _fused(model: onnx.ModelProto, opset: int | None, targets: NormTargets, judged: bool,
           weights_dir=None) -> tuple[onnx.ModelProto, FusionReport, list[NormMatch], dict[str, int | None] | None]:
    """The fused model (`model`, or the opset-raised one, when nothing was fused), its report
    (opsets, every norm's record, the dead nodes removed), the main graph's matches left to verify
    and, when it is to be `judged`, the float type each tensor of `model` is judged at, found on
    the graph already read (verification would otherwise read and infer the original again)."""
    working, read = model, typed_read(model)
    typed = _weights_found(read.model, weights_dir)
    before = default_opset(typed)
    if opset is not None and opset < before:
        raise FusionError(f"--opset {opset} is below the model's opset {before}; fusion never lowers an opset")
    found = norms_in(typed, read.bodies)
    fusable = any(isinstance(m, NormMatch) for _, _, results in found for m in results)
    floats = {value.name: coarsest for value, coarsest in coarsest_floats(typed.graph, elem_type).items()
              if value.name} if judged and fusable else None  # before any rewrite: the original's types
    target = _target_opset([m for _, _, results in found for m in results], before, opset, targets)
    if target != before:
        working = _convert(model, target)
        read = typed_read(working)
        typed = _weights_found(read.model, weights_dir)
        found = norms_in(typed, read.bodies)
    op_types = {kind: targets.op(kind, target)[0] for kind in FUSED_OPS}
    records, matches = _fuse(typed, found, target, targets, op_types)
    report = FusionReport(before, target, records)
    if not any(r.status == "fused" for r in records):
        return working, report, matches, floats
    report.dead_removed, matches = _without_dead_nodes(typed, [graph for _, graph, _ in found], records, matches)
    return written_back(read), report, matches, floats


def _weights_found(model: ir.Model, weights_dir) -> ir.Model:
    """`model` with each weight on disk told the folder its location is relative to (a staged
    export's: `onnx_io.stage_weights`), so that a small one, a norm's scale, reads as a constant
    and is taken into the fused node (`values.constant`)."""
    if weights_dir is not None:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and not tensor.base_dir:
                tensor.base_dir = str(weights_dir)
    return model


def _without_dead_nodes(model: ir.Model, graphs: list[ir.Graph], records: list[NormRecord],
                        matches: list[NormMatch]) -> tuple[int, list[NormMatch]]:
    """In place: every node nothing reads any more is removed (the graph outputs and what any
    If/Loop body reads stay), and the functions and opsets nothing uses, by onnx-ir's passes: the
    Casts and Identities the fused norms bypass first of all (a file is judged by what it runs,
    and dead nodes read as work left). `graphs`: the main graph and every body, counted before and
    after. How many went, and the matches still computed: a fused norm nothing read goes too,
    unverified, and its record says so."""
    before = _node_count(model, graphs)
    for graph in reversed(graphs):  # bodies first: what a dead body node read may die with it
        _remove_unread(graph)
    if model.functions:
        RemoveUnusedFunctionsPass()(model)
    removed = before - _node_count(model, graphs)
    if removed:
        RemoveUnusedOpsetsPass()(model)
    computed = {value.name for node in model.graph for value in node.outputs}
    unread = {m.output for m in matches} - computed
    for record in records:
        if record.status == "fused" and record.output in unread:
            record.notes.append("its output was read by nothing: removed as dead, so not verified")
    return removed, [m for m in matches if m.output in computed]


def _remove_unread(graph: ir.Graph) -> None:
    """Every node of `graph` whose outputs nothing reads, last first so a chain goes at once, and
    then every initializer nothing reads. onnx-ir's RemoveUnusedNodesPass does this and also
    trims the unused optional outputs of every node it keeps, looking up each node's schema: 0.04 s
    on a 96-layer encoder, a sixth of fusing it, for nodes fusion never touched."""
    for node in reversed(graph):
        if not any(output.uses() or output.is_graph_output() for output in node.outputs):
            graph.remove(node, safe=True)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
            graph.initializers.pop(name)


def _node_count(model: ir.Model, graphs: list[ir.Graph]) -> int:
    """The nodes of `graphs` and of the functions (those of a dead If's bodies go uncounted: only the If)."""
    return sum(len(graph) for graph in graphs) + sum(len(function) for function in model.functions.values())


def norms_in(model: ir.Model, bodies: list[tuple[ir.Node, ir.Graph]] | None = None) -> list[GraphNorms]:
    """(node holding the graph or None, graph, its norms) for the main graph and each If/Loop/Scan
    body at any depth (Optimum's merged decoder keeps the whole decoder in both branches of one If).
    `bodies`: the main graph's `nested_graphs`, when the caller has found them already."""
    return [(None, model.graph, find_norms(model.graph)),
            *((holder, body, find_norms(body))
              for holder, body in (nested_graphs(model.graph) if bodies is None else bodies))]


def _norms_reachable(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """`model`, or, when norms sit inside its local functions, the model with those calls inlined
    (`base.functions`) and which functions were, by call count."""
    inlined = inline_functions(model)
    if inlined is None or _count(inlined) <= _count(model):
        return model, {}
    return inlined, called_functions(model)


def _count(model: onnx.ModelProto) -> int:
    return sum(len(results) for _, _, results in norms_in(typed_ir(model)))


def _fuse(model: ir.Model, found: list[GraphNorms], target: int, targets: NormTargets,
          op_types: dict[str, str]) -> tuple[list[NormRecord], list[NormMatch]]:
    """Rewrite the fusable norms of every graph in place: their records, and the main graph's
    matches (fused norms in bodies are checked through the graph's outputs)."""
    names = FreshNames(model.graph, [(holder, graph) for holder, graph, _ in found if holder is not None])
    records: list[NormRecord] = []
    outer: list[NormMatch] = []
    for holder, graph, results in found:
        graph_records, matches = _records(results, target, targets)
        if holder is not None:
            for record in graph_records:
                record.notes.append(f"inside {holder.op_type} '{holder.name}': checked through the graph's outputs")
        if matches:
            rewrite_matches(graph, matches, op_types, names, reusable_params([graph, model.graph], matches))
        records += graph_records
        if holder is None:
            outer = matches
    return records, outer


def _target_opset(found: list[Finding], before: int, requested: int | None, targets: NormTargets) -> int:
    """The opset asked for (below 17 the LayerNorms stay decomposed, reported as left), else the
    model's own raised to what its LayerNorms need; never raised for RMSNorms (they have a
    target at every opset)."""
    if requested is not None:
        newest = onnx.defs.onnx_opset_version()
        if not 7 <= requested <= newest:
            raise FusionError(f"--opset {requested} is not one this onnx {onnx.__version__} can convert to "
                              f"(7 to {newest})")
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
    scopes: dict[str, str] = {}
    for node in model.graph.node:
        scope = get_scope(node)
        if node.name and scope is not None:
            scopes[node.name] = scope
    for node in converted.graph.node:
        if node.name in scopes:
            set_scope(node, scopes[node.name])
    if scopes:
        annotate_scopes(converted)
    return converted


def _records(found: list[Finding], target: int, targets: NormTargets) -> tuple[list[NormRecord], list[NormMatch]]:
    records: list[NormRecord] = []
    matches: list[NormMatch] = []
    for item in found:
        if not isinstance(item, NormMatch):
            records.append(NormRecord(item.kind, item.scope, "refused", item.reason, item.node))
            continue
        op_type, needs = targets.op(item.kind, target)
        record = NormRecord(item.kind, item.scope, "fused", "", item.anchor, item.output, item.epsilon, item.notes,
                            op=op_type, input=item.input.name or "")
        if target < needs:
            record.status = "left"
            record.reason = (f"{op_type} needs opset {needs}, the target is {target} (fuse with --opset {needs}"
                             + (", or export with --ln-target plugin)" if item.kind == "LayerNorm" else ")"))
        else:
            matches.append(item)
        records.append(record)
    return records, matches


def _verify(original, fused, matches: list[NormMatch], records: list[NormRecord], feeds, weights_dir,
            also, floats: dict[str, int | None] | None) -> list[dict[str, np.ndarray]]:
    outer = {m.output for m in matches}
    inner = {r.output: r.input for r in records if r.status == "fused" and r.output not in outer}
    sources = {m.output: m.input.name for m in matches if m.input.name}
    checked = Checked({m.output: m.elem_type for m in matches}, sources, inner, floats)
    verification = verify_fused(original, fused, checked, feeds, weights_dir, also)
    checks = verification.checks
    by_output = {r.output: r for r in records if r.status == "fused"}
    for name, check in checks.items():
        if name in by_output:
            by_output[name].max_abs_error = check.max_abs
            if verification.reference != "ONNX Runtime":
                by_output[name].notes.append(ORIGINAL_RUN_IN + verification.reference)
    failed = [c for c in checks.values() if not c.passed]
    if failed:
        where = by_output.get(failed[0].name)
        what = f"{where.kind} {where.scope or where.node}" if where else f"output '{failed[0].name}'"
        raise AccuracyError(f"fusion changed the numbers of {what}: {failed[0].reason}; nothing was written")
    return verification.outputs
