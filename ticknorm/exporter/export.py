"""Export a PyTorch module to ONNX with either torch exporter, then fuse, verify and write it.

The default exporter is dynamo (`torch.export` based): it is the one torch maintains, it emits
opset 18+ with its optimizer already applied, and it records the module path of every node
itself. TorchScript (opset 13-17) stays available for runtimes that need an older opset.
"""

import contextlib
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, overload

import numpy as np
import onnx

from ticknorm.base.errors import AccuracyError, ExportError, InputSpecError, first_line
from ticknorm.base.graph import coarsest_floats, typed
from ticknorm.base.inputs import graph_feeds
from ticknorm.base.metrics import ArrayComparison, compare_arrays, dtype_tolerance, ensure_finite, within_own_rounding
from ticknorm.base.onnx_io import PROTOBUF_LIMIT, save_onnx, stage_weights, staged
from ticknorm.base.optional import require
from ticknorm.base.scopes import annotate_scopes
from ticknorm.exporter.attention_target import ATTENTION_OPSET, FUSED, ONNX, ORT, PLAIN, TRT, TRT_NOTE, runnable_feeds
from ticknorm.exporter.fused_checks import check_fused_modules
from ticknorm.exporter.fusion import FusionReport, NormTargets, fuse_norms
from ticknorm.exporter.fusion.skip import skip_fused
from ticknorm.exporter.fusion.token_rows import token_rows
from ticknorm.exporter.isolated import run_isolated
from ticknorm.base.precision import TYPE_NAMES, Precision, coarser
from ticknorm.exporter.plugin_target import PluginTargetResult, to_plugin_target
from ticknorm.exporter.precision.convert import Conversion, convert
from ticknorm.exporter.rotary import expand_rotary_caches
from ticknorm.exporter.tasks import DEFAULT as DEFAULT_TASK
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner
from ticknorm.runtime.torch_runner import (as_tensors, forward, from_numpy, module_precision, output_names, own_dtype,
                                           tensor_leaves, to_numpy)

# The opsets each exporter writes: the lowest and the newest (None: any newer one).
TORCHSCRIPT_NEWEST_OPSET = 17
EXPORTERS: dict[str, tuple[int, int | None]] = {"dynamo": (18, None), "torchscript": (13, TORCHSCRIPT_NEWEST_OPSET)}
DEFAULT_EXPORTER = "dynamo"
# The feeds to draw again once the exported graph says how (name -> array; empty: none).
Redraw = Callable[[onnx.ModelProto], dict[str, np.ndarray]]


@dataclass(frozen=True)
class ExportOptions:
    """How to export: which torch exporter and opset, whether to fuse norms (and into what) and to
    check against PyTorch, the task of a Hugging Face model, and from how many bytes of weights
    they go to a `.data` file beside the model."""

    exporter: str = DEFAULT_EXPORTER
    opset: int | None = None
    fuse: bool = True
    check: bool = True
    ln_target: str = "native"  # native: LayerNormalization; plugin: ticknorm::LayerNorm (TensorRT)
    rms_target: str = "auto"  # see fusion.RMS_TARGETS
    task: str = DEFAULT_TASK
    external_data_threshold: int = PROTOBUF_LIMIT
    precision: Precision = Precision()  # fp16/bf16: converted after every fp32 check, with measured fp32 islands
    # Free the PyTorch model's weights once the graph is exported (its outputs are computed by
    # then): ONNX Runtime's sessions then never hold the weights beside it. Only for a model
    # nobody else uses: `ticknorm export` sets it for the models it loads itself.
    release_model: bool = False
    # A Hugging Face folder exported from its shards, checked block by block (`streaming`): on, off,
    # or auto (when its fp32 weights would not fit in the memory available).
    streaming: str = "auto"
    # A decoder's attention (and what surrounds it) as the runtime's fused ops: plain (as the
    # exporter writes it), ort or onnx (see fused_attention)
    target: str = PLAIN
    # --target ort: residual Add + norm as ONNX Runtime's Skip norms (one CUDA kernel) rather than in
    # the form its CPU kernels run fastest (fusion.token_rows)
    skip_norms: bool = False

    @property
    def targets(self) -> NormTargets:
        rms = "ort" if self.target == ORT and self.rms_target == "auto" else self.rms_target
        return NormTargets(rms=rms, plugin=self.ln_target == "plugin")


@dataclass
class ExportResult:
    files: list[Path]
    exporter: str
    opset: int
    fusion: FusionReport | None
    accuracy: list[ArrayComparison] = field(default_factory=list)  # per output, torch vs ORT
    plugin_target: PluginTargetResult | None = None  # with --ln-target plugin
    conversion: Conversion | None = None  # with a low precision: islands, and the checks against PyTorch
    checkpoint_precision: str = "fp32"  # the type the model was loaded in (a bf16 folder's: bf16)
    precision: str = "fp32"  # the type of the written graph: --precision's, whatever the checkpoint's
    notes: list[str] = field(default_factory=list)  # what was rewritten besides the norms, and why

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.accuracy)

    def precision_line(self) -> str:
        """Which precision the graph was written in, and why: --precision's, whatever the checkpoint's."""
        why = (" (--precision)" if self.precision != "fp32"
               else " (the default; --precision fp16|bf16 for a low-precision graph)")
        line = f"graph precision: {self.precision}{why}"
        if self.checkpoint_precision != "fp32":
            checkpoint = TYPE_NAMES[self.checkpoint_precision]
            line += (f"; the checkpoint is {checkpoint}: the graph was exported from its exact "
                     f"fp32 upcast and judged against it and against PyTorch in {checkpoint}")
        return line


def export_model(model, feeds: dict[str, np.ndarray], output, options: ExportOptions = ExportOptions(),
                 dynamic_axes: dict[str, dict[int, str]] | None = None, extra_checks=(),
                 progress=lambda message: None, redraw: Redraw | None = None) -> ExportResult:
    """Export `model` on `feeds` (name -> example array) and write `output` only if every step
    passed: export, LayerNorm fusion with its verification, and the torch-vs-ORT comparison, on
    `feeds` and on each `(label, feeds, PyTorch outputs)` of `extra_checks` (a decoder's prefill
    and decode steps, whose PyTorch outputs the step chain already computed).
    With `options.ln_target="plugin"` the checked graph's LayerNorms then become the TensorRT plugin op
    (ONNX Runtime cannot run that graph, so every check runs before the rewrite). `redraw` gives
    feeds drawn again once the graph exists (ids inside its index ranges): every check runs on those."""
    torch = require("torch", "torch")
    _check_input_names(model, feeds)
    options = target_options(options)
    model.eval()
    tensors = {name: from_numpy(torch, array) for name, array in feeds.items()}  # traced as given
    feeds, extra_checks = runnable_checks(model, feeds, extra_checks, options.target)
    progress("running the PyTorch model")
    names, reference = torch_reference(model, feeds)
    checkpoint = CheckpointChecks(module_precision(model), [("", feeds, reference), *extra_checks])
    if checkpoint.low:
        progress(f"the checkpoint is {TYPE_NAMES[checkpoint.precision]}: exporting its exact fp32 upcast")
        model.float()  # in place: bf16 and fp16 values are all fp32 values, so this loses nothing
        reference = torch_reference(model, feeds)[1]
        extra_checks = [(label, more, torch_reference(model, more)[1]) for label, more, _ in extra_checks]
    with weights_stage(Path(output).parent) as weights_dir:
        proto, options, notes = _exported_graph(model, tensors, options, dynamic_axes or {}, names, weights_dir,
                                                progress)
        if redraw is not None and not checkpoint.low:  # a low checkpoint's own outputs are gone with its types
            feeds, reference = _redrawn(model, feeds, redraw(proto), reference, options.target)
        if options.target == TRT:
            notes.append(TRT_NOTE)
        expanded = expand_rotary_caches(proto)
        if expanded:
            notes.append(f"RotaryEmbedding: the cos/sin caches of {expanded} node(s) expanded to the batch, as the "
                         "standard shapes them (the exporter broadcasts a batch of 1, which ONNX Runtime refuses)")
        if options.target in FUSED and options.check:
            steps = [("", feeds, None), *extra_checks]
            notes.append(_fused_modules_checked(proto, model, steps, weights_dir, progress))
        if options.release_model:
            # every parameter and buffer moved off the CPU, and so freed: the exporter ran in a child process,
            # nothing of it holds them here
            model.to("meta")
        checks = [("", feeds, reference), *extra_checks] if options.check else []
        for label, _, expected in checks[1:]:
            ensure_finite(dict(zip(names, expected)), f"the PyTorch model's ({label})")
        report, outputs = None, None
        if options.fuse:
            progress("fusing LayerNorms and verifying the fused graph in ONNX Runtime")
            fused = fuse_norms(proto, opset=options.opset, feeds=graph_feeds(proto, feeds), targets=options.targets,
                               weights_dir=weights_dir, also=[graph_feeds(proto, f) for _, f, _ in checks[1:]])
            proto, report, outputs = fused.model, fused.report, fused.outputs
            if options.target == ORT:
                if options.skip_norms:
                    proto, report.skips = skip_fused(proto)
                else:
                    proto, report.token_rows = token_rows(proto)
                outputs = outputs if not (report.skips or report.token_rows) else None  # changed: checked anew
        accuracy = _compared(proto, checks, outputs, checkpoint, weights_dir, progress) if options.check else []
        conversion = None
        if options.precision.low:
            progress(f"measuring the fp32 run, converting to {options.precision.dtype} and checking it against PyTorch")
            conversion = convert(proto, feeds, options.precision, dict(zip(names, reference)), weights_dir)
            proto = conversion.model
        retargeted = None
        if options.ln_target == "plugin":
            retargeted = to_plugin_target(proto)
            proto = retargeted.model
        files = save_onnx(proto, output, options.external_data_threshold, weights_dir)
    opset_now = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return ExportResult(files, options.exporter, opset_now, report, accuracy, retargeted, conversion,
                        checkpoint.precision, options.precision.dtype, notes)


def _fused_modules_checked(proto: onnx.ModelProto, model, checks, weights_dir, progress) -> str:
    """Each fused attention against its PyTorch module on every check (`fused_checks`): its line."""
    from ticknorm.exporter.fused_attention import fused_module_paths

    progress("checking each fused attention against its PyTorch module")
    return check_fused_modules(proto, model, fused_module_paths(model), [(label, more) for label, more, _ in checks],
                               weights_dir).line()


def target_options(options: ExportOptions) -> ExportOptions:
    """`options` with the opset `--target` needs; refused where its ops cannot be written."""
    if options.skip_norms and options.target != ORT:
        raise InputSpecError(f"--skip-norms writes ONNX Runtime's Skip norms, for --target ort only "
                             f"(not --target {options.target})")
    if options.skip_norms and not options.fuse:
        raise InputSpecError("--skip-norms fuses each residual Add into its norm, which --no-fuse leaves: give one")
    if options.target not in FUSED:
        return options
    if options.exporter != "dynamo":
        raise InputSpecError(f"--target {options.target} writes its ops through the dynamo exporter; "
                             f"--exporter {options.exporter} writes the plain form only")
    if not options.check:
        raise InputSpecError(f"--target {options.target} writes each fused op only with its check against PyTorch; "
                             "drop --no-check (or export --target plain)")
    if options.ln_target == "plugin":
        raise InputSpecError(f"--target {options.target} writes ONNX Runtime's or ONNX's fused ops, --ln-target plugin "
                             "TensorRT's: give one (--target trt with the plugin)")
    if options.target == ONNX:
        if options.opset is not None and options.opset < ATTENTION_OPSET:
            raise InputSpecError(f"--target onnx writes ONNX's Attention, which opset {ATTENTION_OPSET} brought; "
                                 f"--opset {options.opset} has none")
        return replace(options, opset=options.opset or ATTENTION_OPSET)
    return options


def runnable_checks(model, feeds: dict[str, np.ndarray], extra_checks, target: str):
    """The feeds and extra checks as `target`'s fused ops take them (`runnable_feeds`), each cut
    one with PyTorch's outputs on what it became."""
    checks = []
    for label, more, expected in extra_checks:
        runnable = runnable_feeds(more, target)
        checks.append((label, runnable, expected if runnable is more else torch_reference(model, runnable)[1]))
    return runnable_feeds(feeds, target), checks


def _redrawn(model, feeds: dict[str, np.ndarray], drawn: dict[str, np.ndarray],
             reference: list[np.ndarray], target: str) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """`feeds` with the `drawn` arrays in place (as `target`'s ops run them), and PyTorch's outputs
    on them."""
    if not drawn:
        return feeds, reference
    feeds = runnable_feeds({**feeds, **drawn}, target)
    return feeds, torch_reference(model, feeds)[1]


def _compared(proto: onnx.ModelProto, checks: "list[Check]", outputs, checkpoint: "CheckpointChecks", weights_dir,
              progress) -> list[ArrayComparison]:
    """PyTorch against ONNX Runtime on every check (the fused graph's outputs when fusion ran them
    already); raises AccuracyError, and nothing is written, where they disagree."""
    progress("comparing PyTorch and ONNX Runtime outputs")
    outputs = ort_outputs(proto, checks, outputs, weights_dir)
    accuracy = judge(proto, checks, outputs)
    if checkpoint.low:
        accuracy += judge_checkpoint(proto, checkpoint, checks, outputs)
    disagreeing = [c for c in accuracy if not c.passed]
    if disagreeing:
        raise AccuracyError(f"ONNX Runtime disagrees with PyTorch on output {disagreeing[0].name}: "
                            f"{disagreeing[0].reason}; nothing was written")
    return accuracy


def _exported_graph(model, tensors, options: ExportOptions, dynamic_axes: dict, names: list[str], weights_dir,
                    progress) -> tuple[onnx.ModelProto, ExportOptions, list[str]]:
    """The graph from the exporter asked for, or from TorchScript where dynamo cannot capture the
    model and TorchScript may stand in (`options` then say so, and a note says why)."""
    from ticknorm.exporter.fused_attention import fused_attention

    progress(f"exporting with the {options.exporter} exporter")
    failed: ExportError | None = None
    try:
        with fused_attention(model, options.target) as traced:
            return torch_to_onnx(traced, tensors, options.exporter, options.opset, dynamic_axes, names,
                                 weights_dir), options, []
    except ExportError as exc:
        if not _torchscript_may_stand_in(options, exc):
            raise
        failed = exc
    # outside the handler: TorchScript's own failure chains to nothing of dynamo's
    progress(f"{failed}; exporting with the TorchScript exporter instead")
    try:
        proto = torch_to_onnx(model, tensors, "torchscript", None, dynamic_axes, names, weights_dir)
    except ExportError as exc:
        raise ExportError(f"{failed}; {exc} too, tried instead") from None
    return proto, replace(options, exporter="torchscript"), [
        f"{failed}: exported with the TorchScript exporter instead (opset {TORCHSCRIPT_NEWEST_OPSET})"]


def _torchscript_may_stand_in(options: ExportOptions, failure: ExportError) -> bool:
    """Whether the TorchScript exporter gets its turn: the dynamo exporter failed to capture the
    model at all (torch.export cannot trace a data-dependent branch, as Longformer's `.item()`),
    and no opset past TorchScript's 17 was asked for. A failure to translate an op is not one:
    TorchScript would not know the op either."""
    capture = f"while {_STEPS['1']}" in str(failure)  # the failure crossed the exporter's process as its line
    opset_fits = options.opset is None or options.opset <= TORCHSCRIPT_NEWEST_OPSET
    return options.exporter == "dynamo" and capture and opset_fits and options.target not in FUSED


@contextlib.contextmanager
def weights_stage(folder: Path) -> Iterator[Path]:
    """A folder for the exported weights, beside the output: the exporter writes them there once,
    nothing serializes them again, and the final write gives the file a second name (a hard link,
    no byte copied). The graph in memory holds references only, so a rewrite copies no weights and
    each ONNX Runtime session maps the one file instead of parsing a serialized copy."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ticknorm-weights-", dir=folder) as directory:
        yield Path(directory)


def torch_reference(model, feeds: dict[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    """The model's output names (what the graph outputs will be called) and values on `feeds`."""
    torch = require("torch", "torch")
    outputs = forward(model, as_tensors(feeds, own_dtype(model)))
    names, reference = output_names(torch, outputs), [to_numpy(t) for t in tensor_leaves(torch, outputs)]
    ensure_finite(dict(zip(names, reference)), "the PyTorch model's")
    return names, reference


# One set of feeds to judge the graph on: (label, feeds, PyTorch's outputs in graph output order).
Check = tuple[str, dict[str, np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class CheckpointChecks:
    """A bf16 or fp16 checkpoint's own PyTorch outputs on every check's feeds, computed before the
    model is upcast for the export: the graph is also judged against the model as it was trained,
    at that type's tolerance, beside the tight check against the exact fp32 upcast."""

    precision: str  # fp32, fp16 or bf16
    checks: list[Check]  # PyTorch's outputs in the checkpoint's type

    @property
    def low(self) -> bool:
        return self.precision != "fp32"


def ort_outputs(proto: onnx.ModelProto, checks: list[Check], outputs: list[dict[str, np.ndarray]] | None = None,
                weights_dir=None) -> list[dict[str, np.ndarray]]:
    """ONNX Runtime's outputs on each `(label, feeds, PyTorch outputs)` of `checks`: `outputs` when
    a run of this graph on those feeds is already at hand (the fusion's verification), else one
    session for all of them."""
    names = [o.name for o in proto.graph.output]
    for _, _, reference in checks:
        if len(names) != len(reference):
            raise ExportError(f"the ONNX graph has {len(names)} outputs but the PyTorch model returned "
                              f"{len(reference)} tensors")
    if outputs is not None:
        return outputs
    with OrtRunner(proto, mapped=MappedWeights.staged(weights_dir)) as runner:
        return [runner.infer(graph_feeds(proto, feeds)).outputs for _, feeds, _ in checks]


def judge(proto: onnx.ModelProto, checks: list[Check], outputs: list[dict[str, np.ndarray]],
          reference: str = "fp32") -> list[ArrayComparison]:
    """Each check's PyTorch outputs against ONNX Runtime's, at the tolerance of the coarser of the
    type the output is computed through and the `reference`'s (the type PyTorch ran in)."""
    floats = {value.name: found for value, found in coarsest_floats(typed(proto).graph).items()}
    against = "" if reference == "fp32" else f"vs PyTorch {TYPE_NAMES[reference]}"
    return [compare_arrays(_check_name(name, label, against), expected, actual[name],
                           *dtype_tolerance(_coarsest_dtype(floats.get(name), expected.dtype, reference)))
            for (label, _, expected_outputs), actual in zip(checks, outputs)
            for name, expected in zip([o.name for o in proto.graph.output], expected_outputs)]


def judge_checkpoint(proto: onnx.ModelProto, checkpoint: CheckpointChecks, upcast: list[Check],
                     outputs: list[dict[str, np.ndarray]]) -> list[ArrayComparison]:
    """`judge` against the checkpoint's own PyTorch outputs, where a value past the type's bar
    passes when the exact fp32 upcast is as far from them (`within_own_rounding`)."""
    found = judge(proto, checkpoint.checks, outputs, checkpoint.precision)
    pairs = [(own, up, actual[name]) for (_, _, own_outputs), (_, _, up_outputs), actual in
             zip(checkpoint.checks, upcast, outputs)
             for name, own, up in zip([o.name for o in proto.graph.output], own_outputs, up_outputs)]
    return [within_own_rounding(check, *pair, TYPE_NAMES[checkpoint.precision]) for check, pair in zip(found, pairs)]


def _check_name(name: str, label: str, against: str) -> str:
    qualifiers = ", ".join(part for part in (label, against) if part)
    return f"{name} ({qualifiers})" if qualifiers else name


def _coarsest_dtype(coarsest: int | None, dtype, reference: str = "fp32") -> np.dtype:
    """An output computed through an fp16/bf16 tensor (`coarsest`: the float type with the fewest
    mantissa bits on its way, `base.graph.coarsest_floats`), or judged against PyTorch computing in
    one (`reference`), is judged at that type's tolerance."""
    found = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(coarsest) if coarsest else dtype)
    short = {name: short for short, name in TYPE_NAMES.items()}
    return np.dtype(TYPE_NAMES[coarser(short[found.name], reference)]) if found.name in short else found


def _check_exporter(exporter: str, opset: int | None) -> None:
    if exporter not in EXPORTERS:
        raise InputSpecError(f"unknown exporter '{exporter}'; choose one of: {', '.join(EXPORTERS)}")
    low, high = EXPORTERS[exporter]
    if opset is not None and (opset < low or (high is not None and opset > high)):
        allowed = f"{low}-{high}" if high else f"{low} or newer"
        other = next(name for name in EXPORTERS if name != exporter)
        raise InputSpecError(f"the {exporter} exporter writes opset {allowed}, not {opset}; use --exporter {other}")


def _check_input_names(model, feeds: dict[str, np.ndarray]) -> None:
    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = [name for name in feeds if name not in parameters]
    if unknown:
        raise InputSpecError(f"{type(model).__name__}.forward has no parameter {', '.join(unknown)}; "
                             f"it takes: {', '.join(parameters)}")


def torch_to_onnx(model, tensors: dict[str, Any], exporter: str = DEFAULT_EXPORTER, opset: int | None = None,
                  dynamic_axes: dict[str, dict[int, str]] | None = None, outputs: list[str] | None = None,
                  weights_dir=None) -> onnx.ModelProto:
    """The exporter's graph, unfused, with a `ticknorm.scope` on every node. With `weights_dir`
    the exporter writes there and the graph comes back staged: weights referenced, not held."""
    torch = require("torch", "torch")
    _check_exporter(exporter, opset)
    tensors = {name: value if isinstance(value, torch.Tensor) else from_numpy(torch, value)
               for name, value in tensors.items()}
    model.eval()
    with torch.no_grad():
        proto = _export(torch, model, tensors, exporter, opset, dynamic_axes or {}, outputs, weights_dir)
    annotate_scopes(proto, [name for name, _ in model.named_modules()])
    return proto


def _export(torch, model, tensors: dict[str, Any], exporter: str, opset: int | None,
            dynamic_axes: dict[str, dict[int, str]], outputs: list[str] | None,
            weights_dir=None) -> onnx.ModelProto:
    """The exported graph: in memory, or (with `weights_dir`) written there by the exporter and
    read back staged, weights referenced, not held. The dynamo exporter writes it from a child
    process (`isolated`): it keeps the weights referenced after it returns. TorchScript leaves
    nothing behind and traces real tensors, which a forked child could do on one thread only."""
    kwargs, structure, names = _arguments(model, tensors, dynamic_axes)
    arguments = ExportCall(kwargs, dynamic_shapes(torch, structure), names, outputs, exporter, opset, dynamic_axes)
    if weights_dir is None:
        return _exported(torch, model, arguments)
    target = Path(weights_dir) / "exported.onnx"
    if exporter == "dynamo":
        run_isolated(lambda: _exported(torch, model, arguments, target))
    else:
        _exported(torch, model, arguments, target)
    return stage_weights(target)


@dataclass(frozen=True)
class ExportCall:
    """What torch.onnx.export is called with, besides the model."""

    kwargs: dict[str, Any]  # tensors, nested as the model takes them (a KV cache as pairs)
    dynamic_shapes: dict[str, Any] | None  # dynamo's, nested as `kwargs`
    input_names: list[str]
    output_names: list[str] | None
    exporter: str
    opset: int | None
    dynamic_axes: dict[str, dict[int, str]]  # TorchScript's


@contextlib.contextmanager
def quiet_export(torch):
    """What every export runs in: the exporters' prints, warnings and loggers silenced (our error
    says what matters in one line), and PyTorch attention's fast path off."""
    with warnings.catch_warnings(), _silenced(), _quiet_loggers(), _fast_attention_off(torch):
        warnings.simplefilter("ignore")
        yield


@overload
def _exported(torch, model, call: ExportCall, target: None = None) -> onnx.ModelProto: ...


@overload
def _exported(torch, model, call: ExportCall, target: Path) -> None: ...


def _exported(torch, model, call: ExportCall, target: Path | None = None) -> onnx.ModelProto | None:
    """Export; with `target`, write the file there (weights external) and return nothing."""
    with quiet_export(torch):
        try:
            if call.exporter == "dynamo":
                program = torch.onnx.export(model, (), kwargs=call.kwargs, dynamo=True, opset_version=call.opset,
                                            dynamic_shapes=call.dynamic_shapes, input_names=call.input_names,
                                            output_names=call.output_names, optimize=True, verbose=False)
                if target is None:
                    return program.model_proto
                program.save(str(target), external_data=True)  # from the torch tensors, no proto of them
                return None
            buffer = io.BytesIO()
            torch.onnx.export(model, (), buffer, kwargs=call.kwargs, dynamo=False, opset_version=call.opset or 17,
                              input_names=call.input_names, output_names=call.output_names,
                              dynamic_axes=call.dynamic_axes or None, do_constant_folding=True)
            proto = onnx.load_from_string(buffer.getvalue())
            del buffer
            if target is None:
                return proto
            staged(proto, target)
            return None
        except Exception as exc:  # noqa: BLE001 - exporters raise many unrelated types
            raise ExportError(describe_failure(torch, model, call, exc)) from exc


def _arguments(model, tensors: dict[str, Any], dynamic_axes: dict[str, dict[int, str]]
               ) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Keyword arguments, their dynamic axes in the same structure, and the flat input names: as
    given, or nested the way a wrapper such as `HfGraph` takes them (a KV cache as pairs)."""
    if hasattr(model, "export_arguments"):
        return model.export_arguments(tensors, dynamic_axes)
    return tensors, {name: dynamic_axes.get(name, {}) for name in tensors}, list(tensors)


def dynamic_shapes(torch, structure):
    """`{input: {axis: Dim}}` (nested like the arguments) with one Dim object per axis name, so
    shared names stay equal; None when nothing is dynamic."""
    dims: dict[str, object] = {}  # axis name -> its torch.export.Dim

    def convert(node):
        if isinstance(node, list):
            return [convert(item) for item in node]
        if all(isinstance(key, int) for key in node):
            return {axis: dims.setdefault(label, torch.export.Dim(label)) for axis, label in node.items()}
        return {name: convert(value) for name, value in node.items()}

    shapes = convert(structure)
    return shapes if dims else None


@contextlib.contextmanager
def _fast_attention_off(torch):
    """`nn.MultiheadAttention`'s inference fast path (`aten::_native_multi_head_attention`, taken
    in eval under no_grad) has no ONNX translation: export the plain path, as training runs it."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextlib.contextmanager
def _silenced():
    """Swallow what the exporters print, Python's and C++'s (the TorchScript exporter dumps its
    whole IR graph to file descriptor 2 on failure); our error says what matters in one line."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    python_streams = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with tempfile.TemporaryFile() as sink, python_streams[0], python_streams[1]:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for descriptor in saved:
                os.close(descriptor)


@contextlib.contextmanager
def _quiet_loggers():
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# How the exporters name the op they could not translate, most specific first: the dynamo exporter's
# OpOverload (`op='transformers.grouped_mm_fallback'`) or fx target (`torch.ops.aten.histc.default`),
# TorchScript's `aten::histc`.
_OP_PATTERNS = (re.compile(r"op='([A-Za-z_]\w*)\.([A-Za-z0-9_]+)'"),
                re.compile(r"torch\.ops\.([A-Za-z_]\w*)\.([A-Za-z0-9_]+)"),
                re.compile(r"\b(aten)[.:]{1,2}([A-Za-z0-9_]+)"))
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STEP = re.compile(r"step (\d)/3")
_STEPS = {"1": "capturing the graph with torch.export", "2": "decomposing the captured graph",
          "3": "translating the graph to ONNX"}


_FAILED_NODE = re.compile(r"translating node %(\w+)")


def describe_failure(torch, model, call: "ExportCall", exc: Exception) -> str:
    """One line: which op failed and in which module it was called (the dynamo exporter's failed
    node looked up in the program torch.export captures, else found by re-running the model with
    the torch calls and dispatched ops watched); where no op is named, the exporter's step and its
    root cause (the last exception of the chain: the dynamo exporter's own first line only says
    which step failed)."""
    exporter = call.exporter
    chain = list(_chain(exc))
    text = _ANSI.sub("", " ".join(str(e) for e in chain))
    found = next((match for pattern in _OP_PATTERNS for match in [pattern.search(text)] if match), None)
    if not found:
        step = _STEP.search(text)
        during = f" while {_STEPS[step.group(1)]}" if step else ""
        cause = chain[-1]
        return f"the {exporter} exporter failed{during}: {type(cause).__name__}: {_ANSI.sub('', first_line(cause))}"
    namespace, op = found.groups()
    node = _FAILED_NODE.search(text)
    module = _module_of_node(torch, model, call, node.group(1)) if node and exporter == "dynamo" else None
    module = module if module is not None else _module_calling(torch, model, call.kwargs, op)
    kind = type(_submodule(model, module)).__name__ if module is not None else ""
    where = f" in module '{module or '(root)'}' ({kind})" if module is not None else ""
    return f"the {exporter} exporter cannot export op {namespace}::{op}{where}: it has no ONNX translation for it"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    link: BaseException | None = exc
    while link is not None:
        yield link
        link = link.__cause__ or link.__context__


def _submodule(model, path: str):
    return model.get_submodule(path) if path else model


def _module_of_node(torch, model, call: "ExportCall", node: str) -> str | None:
    """The module path torch.export records for a node of the captured program (its
    `nn_module_stack`); None when the capture fails too or the node is not in it."""
    try:
        program = torch.export.export(model, (), kwargs=call.kwargs, dynamic_shapes=call.dynamic_shapes, strict=False)
    except Exception:  # noqa: BLE001 - best effort: the dispatch spy still looks
        return None
    found = next((n for n in program.graph.nodes if n.name == node), None)
    stack = list(found.meta.get("nn_module_stack", {}).values()) if found is not None else []
    return str(stack[-1][0]) if stack else None


def _module_calling(torch, model, tensors: dict[str, Any], op: str) -> str | None:
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    stack = [""]  # the path of the module running now
    hits: list[str] = []  # the module that called `op` first

    def enter(path):
        return lambda _module, _args: stack.append(path)  # append returns None: inputs unchanged

    def leave(_module, _args, _output):
        stack.pop()  # a forward hook's return value would replace the output

    handles = []
    for path, module in model.named_modules():
        if path:
            handles += [module.register_forward_pre_hook(enter(path)), module.register_forward_hook(leave)]

    class _Spy(TorchDispatchMode):  # ops as dispatched (aten::histc)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not hits and func._schema.name.split("::")[-1] == op:
                hits.append(stack[-1])
            return func(*args, **(kwargs or {}))

    class _CallSpy(TorchFunctionMode):  # torch calls, before a composite op decomposes (torch.diff)
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if not hits and getattr(func, "__name__", None) == op:
                hits.append(stack[-1])
            return func(*args, **(kwargs or {}))

    try:
        with torch.no_grad(), _Spy(), _CallSpy():
            model(**tensors)
    except Exception:  # noqa: BLE001 - best effort: the op name alone is still reported
        pass
    finally:
        for handle in handles:
            handle.remove()
    return hits[0] if hits else None
