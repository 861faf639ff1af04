"""The library calls the CLI makes, one per command, and what `import ticknorm` offers: each takes
a model object or the CLI's strings, example inputs as tensors or as `Inputs`, and small
parameter objects instead of long keyword lists.

    import ticknorm
    ticknorm.export(model, (input_ids,), "model.onnx")
    report = ticknorm.compare("model.onnx", model, (input_ids,), runtimes=["ort"])
"""

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from ticknorm.base.atomic import check_writable, check_writable_folder, write_text
from ticknorm.base.errors import InputSpecError
from ticknorm.base.graph import check_branches
from ticknorm.base.graph_feeds import GraphFeeds, feeds_for_file
from ticknorm.base.inputs import Inputs, graph_feeds
from ticknorm.base.metrics import Tolerance
from ticknorm.base.onnx_io import has_external_weights, load_onnx, model_digest, save_onnx
from ticknorm.base.precision import Precision
from ticknorm.base.progress import QUIET, Progress
from ticknorm.base.run_results import SavedReference
from ticknorm.base.node_scopes import by_node_where_unscoped
from ticknorm.base.scopes import LayerSelection, ensure_scopes, fit_scopes
from ticknorm.exporter.attention_target import FUSED
from ticknorm.exporter.export import ExportOptions, ExportResult, export_model, torch_reference
from ticknorm.exporter.fusion import FusionResult, NormTargets, fuse_norms
from ticknorm.exporter.inspect import ModelSummary, summarize
from ticknorm.exporter.model_ref import ModelRef, task_feeds, torch_feeds
from ticknorm.exporter.plugin_target import PluginTargetResult, to_plugin_target
from ticknorm.exporter.streaming import StreamedModel, export_streamed, streams
from ticknorm.exporter.tasks import WITH_PAST, task_of_graph
from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.collect_trtexec import import_trtexec
from ticknorm.profiler.profile import ProfileResult, Timing, profile_runtimes
from ticknorm.report.drift_plot import plot_history
from ticknorm.report.joined import JoinedReport, join, write_html
from ticknorm.report.ticks_plot import plot_ticks
from ticknorm.exporter.precision.convert import Conversion
from ticknorm.exporter.precision.convert import convert as convert_graph
from ticknorm.exporter.precision.targets import runner_setup
from ticknorm.plugins import plugin_nodes
from ticknorm.runtime.base import check_feeds, graph_input_meta
from ticknorm.runtime.registry import RunnerSetup, Runtimes, RuntimeStatus, needs_weights, runtime_statuses
from ticknorm.runtime.file_reference import FileReference, check_reference, file_reference
from ticknorm.runtime.trt_runner import profile_for
from ticknorm.runtime.torch_runner import to_numpy
from ticknorm.ticks.log import read_ticks
from ticknorm.ticks.ranges import DEFAULT_HEADROOM, TickSummary, summarize_ticks
from ticknorm.validate.compare import CompareReport, compare_runtimes
from ticknorm.validate.drift import (DriftReport, GoldenSources, History, check_bundle, read_history, rows_by_node,
                                     versions, write_bundle)
from ticknorm.validate.host_check import HostReport, check_host


def export(model, inputs, output, options: ExportOptions = ExportOptions(), report=None,
           progress: Progress = QUIET) -> ExportResult:
    """Export, fuse, verify and compare with PyTorch; nothing is written unless all of that
    passed. A decoder exported for `text-generation-with-past` is also compared on a prefill and
    two decode steps. `report` writes the fusion report as JSON."""
    from ticknorm.exporter.hf import generation_checks

    _writable(output, report)
    progress.step("loading the model")
    reference = _model_ref(model)
    if streams(reference.source, reference.checkpoint, reference.adapter, options.streaming):
        if options.target in FUSED:
            raise InputSpecError(f"--target {options.target}: the streamed export (a folder larger than memory) "
                                 "writes the plain form only; export with --target plain, or on a machine whose "
                                 "memory holds the fp32 model with --streaming off")
        result = _export_streamed(reference.source, inputs, output, options, progress)
        _write_export_report(report, result)
        return result
    module = reference.load(options.task)
    if options.target in FUSED and hasattr(module, "full_cache"):
        module.full_cache = True  # the fused ops' cache: every token kept
    options = dataclasses.replace(options, release_model=options.release_model or reference.owned)
    feeds, dynamic_axes = _feeds(inputs, module)
    extra_checks = []
    if options.check and options.task == WITH_PAST:
        extra_checks += generation_checks(module, feeds, seed=_seed(inputs))
    if options.check and isinstance(inputs, Inputs) and inputs.file is not None:  # every further iteration too
        for number, more in enumerate(inputs.feed_sets()[1:], start=2):
            more = task_feeds(module, more, {}, inputs.seed)[0]
            extra_checks.append((f"iteration {number}", more, torch_reference(module, more)[1]))
    redraw = inputs.in_index_ranges if isinstance(inputs, Inputs) else None
    result = export_model(module, feeds, output, options=options, dynamic_axes=dynamic_axes, extra_checks=extra_checks,
                          progress=progress.step, redraw=redraw)
    _write_export_report(report, result)
    return result


def _export_streamed(folder, inputs, output, options: ExportOptions, progress: Progress) -> ExportResult:
    """A folder's model on the meta device, its feeds made with its weights read on demand (a
    decoder's cache from a real prefill), exported and checked block by block."""
    streamed = StreamedModel.of(folder, options.task)
    progress.step("building the feeds (the model's weights read one module at a time)")
    with streamed.meta.weights_on_demand():
        feeds, dynamic_axes = _feeds(inputs, streamed.graph)
    return export_streamed(streamed, feeds, dynamic_axes, output, options, progress)


def _write_export_report(report, result: ExportResult) -> None:
    if report is not None and (result.fusion is not None or result.conversion is not None):
        written = json.loads(result.fusion.to_json()) if result.fusion is not None else {}
        written.update(result.conversion.to_dict() if result.conversion is not None else {})
        write_text(report, json.dumps(written, indent=2, default=float))


def convert(source, output, precision: Precision, inputs=None, report=None, progress: Progress = QUIET) -> Conversion:
    """An fp32 ONNX file in `precision.dtype` with fp32 islands measured on `inputs` (seeded random
    feeds when none are given), checked against the fp32 graph's own outputs, then written."""
    _writable(output, report)
    model = _onnx(source)
    if not precision.low:
        raise InputSpecError("convert needs --precision fp16 or bf16")
    own = Precision.of_graph(model)
    if own.low:
        raise InputSpecError(f"the graph is already {own.dtype}; convert its fp32 export")
    feeds = _file_feeds(model, inputs, progress).feed_sets[0]
    progress.step(f"measuring the fp32 run, converting to {precision.dtype} and checking it")
    conversion = convert_graph(model, feeds, precision)
    save_onnx(conversion.model, output)
    if report is not None:
        write_text(report, conversion.to_json())
    return conversion


def fuse(source, output, inputs=None, opset=None, verify: bool = True, report=None,
         targets: NormTargets = NormTargets()) -> tuple[FusionResult, PluginTargetResult | None]:
    """Fuse and verify (on the native graph, which ONNX Runtime runs; on `inputs` when given,
    seeded random feeds otherwise), then retarget LayerNorms to the TensorRT plugin when
    `targets.plugin`: the plugin result comes second, None for the native target."""
    _writable(output, report)
    model = _onnx(source)
    feeds, *more = _file_feeds(model, inputs).feed_sets if _given(inputs) else [None]
    result = fuse_norms(model, opset=opset, verify=verify, feeds=feeds, targets=targets, also=more)
    retargeted = to_plugin_target(result.model) if targets.plugin else None
    save_onnx(retargeted.model if retargeted else result.model, output)
    if report is not None:
        write_text(report, result.report.to_json())
    return result, retargeted


def inspect(source) -> ModelSummary:
    """The file as written: its scopes are counted by where they come from before any is filled in."""
    model = source if isinstance(source, onnx.ModelProto) else load_onnx(source)
    check_branches(model, _name(source))
    return summarize(model)


def runtimes() -> list[RuntimeStatus]:
    return runtime_statuses()


def check_runtimes(progress: Progress = QUIET) -> HostReport:
    """Prove every runtime installed here on a small fused LayerNorm model against PyTorch fp32,
    and on a CUDA host ticknorm's kernel and its TensorRT PTX; `report.exit_code` is the CLI's."""
    return check_host(progress.step)


def compare(source, model, inputs, runtimes=("ort",), tolerance: Tolerance | None = None,
            layers: LayerSelection | None = None, progress: Progress = QUIET,
            reference: SavedReference | str | None = None) -> CompareReport:
    """PyTorch (fp32 CPU) vs each runtime (names, or a `Runtimes`), per output and, with `layers`,
    per module, each at the tolerance of the type it computes in unless `tolerance` says otherwise.
    Low-precision targets run with fp32 islands measured on these inputs (`report.fp32_islands`).
    With `reference` (`read_reference("outputs.json")`: Polygraphy's saved outputs) the outputs are
    judged against it; `model` may then be None, and `inputs` must be those it was made from.
    With `model` None and no saved outputs, the file is judged alone (`file_reference`): against
    itself in fp32 on ONNX Runtime CPU with optimizations off, or the runtime or .onnx file that
    `reference` names; `inputs` may then be None (feeds made from the graph)."""
    runtimes = Runtimes.of(runtimes)
    judged = _judged_setup(source, model, inputs, reference, runtimes, progress)
    report = compare_runtimes(judged.model, judged.feed_sets, runtimes.names, judged.setup, tolerance=tolerance,
                              layers=layers, progress=progress.step, reference=judged.reference)
    report.fp32_islands = {dtype: list(low.policy.islands) for dtype, low in judged.setup.low.items()}
    return report


def profile(source, model, inputs, runtimes=(), timing: Timing = Timing(),
            progress: Progress = QUIET) -> ProfileResult:
    """Per-module latency on every runtime (names, or a `Runtimes`; none: torch and ort, or ort
    alone without a model), aligned on PyTorch modules, on the first iteration's feeds;
    `Runtimes.trtexec` adds the TensorRT layers trtexec timed on a target GPU, mapped to the same
    modules. With `model` None the file is profiled alone: its own scopes are the modules, its
    nodes where it names none, and `inputs` may be None (feeds made from the graph)."""
    runtimes = _named(Runtimes.of(runtimes), model)
    weights = needs_weights(runtimes.names)
    if model is None:
        alone = _file_alone(source, inputs, progress, weights)
        onnx_model, module, feeds, by_node = alone.model, None, alone.feed_sets[0], alone.by_node
    else:
        onnx_model, module, (feeds, *_) = _judged(source, model, inputs, progress, weights)
        by_node = False
    setup = _setup(source, onnx_model, module, feeds, runtimes, progress)
    result = _timings(onnx_model, feeds, runtimes, setup, timing, progress)
    result.unit = "node" if by_node else "module"
    return result


def _named(runtimes: Runtimes, model) -> Runtimes:
    """`runtimes`, or when none are named the default: PyTorch and ONNX Runtime, ONNX Runtime alone
    for a file without its model."""
    if runtimes.names:
        return runtimes
    return dataclasses.replace(runtimes, names=("torch", "ort") if model is not None else ("ort",))


def _timings(onnx_model, feeds, runtimes: Runtimes, setup, timing: Timing, progress: Progress) -> ProfileResult:
    """The runtimes timed here, and the TensorRT layers trtexec timed elsewhere when given."""
    # read first: a file that does not fit stops the command before the timing
    imported = import_trtexec(runtimes.trtexec, ScopeTable(onnx_model)) if runtimes.trtexec is not None else None
    result = profile_runtimes(onnx_model, feeds, runtimes.names, setup, timing=timing, progress=progress)
    if imported is not None:
        result.logs[imported.runtime] = imported
    return result


@dataclasses.dataclass(frozen=True)
class Judging:
    """How `report` judges the outputs: at `tolerance` (None: each type's default), and without a
    PyTorch model against `reference` (a runtime's name or an .onnx file; None: the file itself in
    fp32 on ONNX Runtime CPU, optimizations off)."""

    tolerance: Tolerance | None = None
    reference: str | None = None


def report(source, model, inputs, output, runtimes=(), timing: Timing = Timing(), judging: Judging = Judging(),
           progress: Progress = QUIET) -> JoinedReport:
    """Latency and error per module on one row: profile every runtime, compare every non-torch
    runtime with PyTorch per module at the same depth (with the same precision policy and
    tolerances as `compare`), and write the HTML page to `output`. The report's `passed` is the
    comparison's verdict. The first iteration's feeds. With `model` None the file is reported
    alone, judged as `compare` judges it (against itself in fp32, or `judging.reference`)."""
    _writable(output)
    runtimes = _named(Runtimes.of(runtimes), model)
    judged = _judged_setup(source, model, inputs, judging.reference, runtimes, progress)
    onnx_model, feeds, setup = judged.model, judged.feed_sets[0], judged.setup
    timings = _timings(onnx_model, feeds, runtimes, setup, timing, progress)
    progress.step(f"comparing every module with {'PyTorch' if model is not None else 'the reference'}")
    targets = [r for r in runtimes.names if r != "torch"]
    accuracy = compare_runtimes(onnx_model, feeds, targets, setup, tolerance=judging.tolerance,
                                layers=LayerSelection(timing.depth), progress=progress.step, reference=judged.reference)
    timings.unit = accuracy.unit
    meta = {"model": _name(source), "model_digest": model_digest(onnx_model, setup.weights_dir),
            "reference": accuracy.reference,
            "inputs": {name: f"{list(value.shape)} {value.dtype}" for name, value in feeds.items()},
            "tolerances": {r: {"atol": atol, "rtol": rtol} for r, (atol, rtol) in accuracy.tolerances.items()},
            "timing": asdict(timing), "created": time.strftime("%Y-%m-%d %H:%M:%S %z"), "versions": versions()}
    joined = JoinedReport(join(timings, accuracy), timings, accuracy, meta)
    write_html(joined, output, f"ticknorm report: {_name(source)}")
    return joined


def snapshot(source, model, inputs, output, tolerance: Tolerance | None = None,
             layers: LayerSelection = LayerSelection(), progress: Progress = QUIET,
             sources: GoldenSources = GoldenSources()) -> Path:
    """Write a golden bundle: every iteration's inputs and PyTorch outputs, per-module statistics (of
    the first), tolerances, versions. `sources.saved` (Polygraphy's saved outputs of `inputs`) are
    then the reference outputs, and `model`, if given, adds the per-module statistics;
    `sources.calibration` (a ticks file) adds the ranges each norm reached in training. With
    `model` None and no saved outputs the file is its own reference, as `compare` judges it alone
    (`sources.reference` may name a runtime or an .onnx file instead); bundle.json says which."""
    check_writable_folder(output, "bundle")
    judged = _judged_setup(source, model, inputs, sources.reference, Runtimes(()), progress, weights=True)
    return write_bundle(judged.model, judged.setup.module, judged.feed_sets, output, tolerance=tolerance,
                        layers=layers, progress=progress.step,
                        sources=dataclasses.replace(sources, reference=judged.reference))


def check(bundle, source, runtime: str = "ort", allow_model_change: bool = False,
          progress: Progress = QUIET, record: bool = True) -> DriftReport:
    """Re-run the model on the bundle's inputs and compare with its reference; the verdict is
    appended to the bundle's history unless `record` is False (a read-only checkout)."""
    model = _onnx(source, weights=needs_weights([runtime]))
    if rows_by_node(bundle):  # made from the file alone, which names no module: its nodes are the rows
        by_node_where_unscoped(model)
    return check_bundle(bundle, model, runtime=runtime, allow_model_change=allow_model_change,
                        progress=progress.step, record=record, weights_dir=_weights_folder(source, model))


def history(bundle, plot=None) -> History:
    """The bundle's past checks (damaged lines skipped and counted); `plot` draws them."""
    found = read_history(bundle)
    if plot is not None:
        plot_history(found.entries, plot)
    return found


def show_ticks(path, plot=None, headroom: float = DEFAULT_HEADROOM) -> TickSummary:
    """A ticks file per module: its range over the training steps, which modules pass fp16's max
    divided by `headroom` and which pass fp16's max, from which step; `plot` draws it to a PNG."""
    summary = summarize_ticks(read_ticks(path), Path(path).name, headroom)
    if plot is not None:
        plot_ticks(summary, plot)
    return summary


def trtexec_line(source, inputs=None, prefix: str = "trtexec") -> str:
    """The trtexec command that times `source` on a target GPU and writes the two files `profile`
    reads: strongly typed (the precision is the graph's), shapes from `inputs` (or the graph's
    static ones), detailed layer info, profiling in a run of its own."""
    model = _onnx(source)
    if plugin_nodes(model):
        raise InputSpecError("the graph holds ticknorm::LayerNorm plugin nodes, which trtexec cannot load (the plugin "
                             "is registered from Python); export with --ln-target native for trtexec")
    found = _file_feeds(model, inputs)
    shapes = profile_for(model, graph_feeds(model, found.feed_sets[0]))
    line = ["trtexec", f"--onnx={_name(source)}", "--stronglyTyped"]
    if any(low != high for low, _, high in shapes.values()):
        for flag, which in (("minShapes", 0), ("optShapes", 1), ("maxShapes", 2)):
            line.append(f"--{flag}=" + ",".join(f"{name}:{'x'.join(map(str, dims[which]))}"
                                                 for name, dims in shapes.items()))
    line += ["--profilingVerbosity=detailed", "--separateProfileRun", f"--exportProfile={prefix}.profile.json",
             f"--exportLayerInfo={prefix}.layers.json", "2>&1", "|", "tee", f"{prefix}.log"]
    stated = [f"# {found.note}"] if found.note else []  # the sizes --*Shapes were drawn from
    return "\n".join([" ".join(line), *stated,
                      f"# then: ticknorm profile ... --trtexec-profile {prefix}.profile.json --trtexec-layers "
                      f"{prefix}.layers.json --trtexec-log {prefix}.log",
                      "# TensorRT 11 builds every network strongly typed: drop --stronglyTyped there if it refuses it"])


def _writable(*outputs) -> None:
    """Every file the call will write, checked before it does any work."""
    for output in outputs:
        if output is not None:
            check_writable(output)


def _model_ref(model) -> ModelRef:
    return model if isinstance(model, ModelRef) else ModelRef(model)


def _onnx(source, weights: bool = True) -> onnx.ModelProto:
    """The model, every node mapped to its module (a foreign file's from its exporter's records),
    its If branches checked against their node; without `weights`, a file's graph alone. A
    caller's ModelProto is copied first: the scopes written here are ticknorm's reading of it, and
    a later save or call would take them for the file's own."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    else:
        model = load_onnx(source, weights)
    check_branches(model, _name(source))
    return ensure_scopes(model)


def _name(source) -> str:
    return source.graph.name if isinstance(source, onnx.ModelProto) else Path(source).name


def _given(inputs) -> bool:
    return inputs is not None and (not isinstance(inputs, Inputs) or inputs.given)


def _file_feeds(model: onnx.ModelProto, inputs, progress: Progress = QUIET, module=None) -> GraphFeeds:
    """Every iteration's feeds for a file: the given ones (`Inputs`, or what a Python caller
    holds), completed by `module`'s task, then from the graph; the sizes chosen for symbolic dims
    nothing fixed are said on `progress`."""
    if _given(inputs):
        inputs = _as_inputs(inputs, module)
    complete = (lambda feeds: task_feeds(module, feeds, {}, _seed(inputs))[0]) if module is not None else None
    found = feeds_for_file(model, inputs, complete)
    if found.note:
        progress.step(found.note)
    return found


def _seed(inputs) -> int:
    return inputs.seed if isinstance(inputs, Inputs) else 0


def _feeds(inputs, module) -> tuple[dict, dict]:
    """An export's feeds (name -> array) and dynamic axes from `Inputs`, or from what a Python
    caller holds: one tensor or array, a tuple of them in forward()'s order, or a dict by name;
    completed with what `module`'s task needs (masks, decoder ids, a KV cache)."""
    inputs = _as_inputs(inputs, module)
    feeds, axes = inputs.feeds()
    return task_feeds(module, feeds, axes, inputs.seed)


def _as_inputs(values, module) -> Inputs:
    """`Inputs` as given, or what a Python caller holds as named arrays."""
    return values if isinstance(values, Inputs) else Inputs(arrays=_named_arrays(values, module))


def _named_arrays(values, module) -> dict[str, np.ndarray]:
    if isinstance(values, dict):
        return {name: _array(value) for name, value in values.items()}
    values = values if isinstance(values, (tuple, list)) else (values,)
    if module is None:
        raise InputSpecError("name the inputs: give a dict {input name: array} (there is no forward() to name them)")
    import inspect as signature

    names = [p.name for p in signature.signature(module.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(values) > len(names):
        raise InputSpecError(f"{len(values)} inputs given, {type(module).__name__}.forward takes {len(names)}: "
                             f"{', '.join(names)}")
    return {name: _array(value) for name, value in zip(names, values)}


def _array(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    return to_numpy(value) if hasattr(value, "detach") else np.asarray(value)


def _judged(source, model, inputs, progress: Progress, weights: bool = True):
    """The ONNX model (its scopes moved onto the PyTorch model's module paths), the PyTorch model
    it came from (built for the graph's task), and every iteration's feeds for both: what every
    command that judges an export against PyTorch starts with. Commands that run one input
    (profile, report) take the first iteration. Without `weights`, a file's graph alone, for
    runtimes that read the file themselves."""
    onnx_model = _onnx(source, weights)
    progress.step("loading the model")
    module = _model_ref(model).load(task_of_graph(i.name for i in onnx_model.graph.input))
    fit_scopes(onnx_model, [name for name, _ in module.named_modules()])  # a wrapper's prefix off its names
    graph_only = {value.name for value in onnx_model.graph.input}
    feed_sets = [torch_feeds(module, feeds, graph_only)
                 for feeds in _file_feeds(onnx_model, inputs, progress, module).feed_sets]
    return onnx_model, module, _fitting(onnx_model, source, feed_sets)


def _fitting(onnx_model, source, feed_sets: list[dict]) -> list[dict]:
    """`feed_sets`, once each is checked against the graph's declared inputs (names, dtypes, ranks,
    fixed dims), so a feed that does not fit is named before any runtime fails on it."""
    for feeds in feed_sets:
        check_feeds(_name(source), graph_input_meta(onnx_model), graph_feeds(onnx_model, feeds))
    return feed_sets


def _reference_run(source, model, inputs, reference: SavedReference | None, progress: Progress,
                   weights: bool = True):
    """`_judged`, where saved outputs may stand in for the PyTorch model (`model` None): the
    inputs are then the ones those outputs were made from, as given."""
    if model is not None:
        return _judged(source, model, inputs, progress, weights)
    if reference is None:
        raise InputSpecError("give the PyTorch model (--model) or saved outputs to judge against (--reference-outputs)")
    if not _given(inputs):
        raise InputSpecError(f"{reference.label} is judged on the inputs it was made from: give them (--input-file)")
    onnx_model = _onnx(source, weights)
    return onnx_model, None, _fitting(onnx_model, source, _file_feeds(onnx_model, inputs, progress).feed_sets)


@dataclasses.dataclass(frozen=True)
class _FileAlone:
    """A file without its PyTorch model: the graph (scopes ensured, its nodes as rows where it
    names no module), every iteration's feeds, and whether its rows are nodes."""

    model: onnx.ModelProto
    feed_sets: list[dict]
    by_node: bool


def _file_alone(source, inputs, progress: Progress, weights: bool = True) -> _FileAlone:
    """The file and its feeds: the inputs given, else feeds made from the graph alone."""
    onnx_model = _onnx(source, weights)
    by_node = by_node_where_unscoped(onnx_model)
    feed_sets = _file_feeds(onnx_model, inputs, progress).feed_sets
    return _FileAlone(onnx_model, _fitting(onnx_model, source, feed_sets), by_node)


@dataclasses.dataclass(frozen=True)
class _Judged:
    """What a judging command (compare, report, snapshot) runs: the graph, every iteration's
    feeds, the runners' setup (its `module` PyTorch's, None without it) and the reference when it
    is not PyTorch."""

    model: onnx.ModelProto
    feed_sets: list[dict]
    setup: RunnerSetup
    reference: SavedReference | FileReference | None


def _judged_setup(source, model, inputs, reference, runtimes: Runtimes, progress: Progress,
                  weights: bool | None = None) -> _Judged:
    """The PyTorch model when given is the reference (or saved outputs, `reference` a
    `SavedReference`); else the file alone is judged against `file_reference(reference)`. The
    graph is read with its weights when `weights`, or (None) when the runtimes need them."""
    weights = needs_weights(runtimes.names) if weights is None else weights
    if model is None and not isinstance(reference, SavedReference):
        check_reference(reference)
        alone = _file_alone(source, inputs, progress, weights)
        setup = _setup(source, alone.model, None, alone.feed_sets[0], runtimes, progress)
        return _Judged(alone.model, alone.feed_sets, setup,
                       file_reference(alone.model, reference, setup, alone.by_node))
    if isinstance(reference, str):
        raise InputSpecError(f"--reference {reference} judges a file alone: with --model, PyTorch is the reference "
                             "(leave out one of them)")
    onnx_model, module, feed_sets = _reference_run(source, model, inputs, reference, progress, weights)
    return _Judged(onnx_model, feed_sets, _setup(source, onnx_model, module, feed_sets[0], runtimes, progress),
                   reference)


def _setup(source, onnx_model, module, feeds, runtimes: Runtimes, progress: Progress) -> RunnerSetup:
    """How every runtime runs `onnx_model`; ONNX Runtime reads it from `source` when it is a file,
    and maps the weights a graph read alone references from the file's folder."""
    setup = runner_setup(onnx_model, module, feeds, runtimes, progress.step)
    if isinstance(source, onnx.ModelProto):
        return setup
    return dataclasses.replace(setup, model_file=str(source), weights_dir=_weights_folder(source, onnx_model))


def _weights_folder(source, onnx_model) -> str | None:
    """Where the weights of a file's graph read alone are: the file's folder (None for a graph
    holding its weights, or given in memory)."""
    if isinstance(source, onnx.ModelProto) or not has_external_weights(onnx_model):
        return None
    return str(Path(source).resolve().parent)
