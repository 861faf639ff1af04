"""The library calls the CLI makes, one per command, usable from Python as they are."""

from pathlib import Path

import numpy as np

from ticknorm.base.atomic import write_text
from ticknorm.base.errors import InputSpecError
from ticknorm.exporter.export import DEFAULT_EXPORTER, ExportResult, export_model
from ticknorm.exporter.fusion import FusionResult, NormTargets, fuse_norms
from ticknorm.exporter.inspect import ModelSummary, summarize
from ticknorm.exporter.load import build_model, load_hf_directory
from ticknorm.exporter.lora import merge_adapter
from ticknorm.exporter.tasks import WITH_PAST, task_of_graph
from ticknorm.exporter.plugin_target import PluginTargetResult, to_plugin_target
from ticknorm.base.inputs import feeds_from_specs, index_ranges, load_npz, parse_input_spec
from ticknorm.base.onnx_io import PROTOBUF_LIMIT, load_onnx, save_onnx
from ticknorm.profiler.profile import ProfileResult
from ticknorm.profiler.profile import profile as run_profile
from ticknorm.report.joined import JoinedRow, join, write_html
from ticknorm.report.joined import write_json as write_joined_json
from ticknorm.runtime.registry import runtime_statuses
from ticknorm.runtime.trt_runner import TrtSettings, profile_for
from ticknorm.validate.compare import CompareReport, Tolerance
from ticknorm.validate.compare import compare as compare_models
from ticknorm.report.drift_plot import plot_history
from ticknorm.validate.drift import DriftReport, check, history, snapshot
from ticknorm.validate.overflow import fp16_overflows


def load_model(model: str, checkpoint=None, trust_pickle: bool = False, adapter=None, task: str = "default"):
    """`model` is a factory (`pkg.mod:fn`, `file.py:fn`) or a Hugging Face `save_pretrained` folder;
    `adapter` a PEFT folder merged into it. A transformers model comes wrapped for `task` (named
    tensors in and out, flags and cache handled), anything else as it is."""
    if Path(model).is_dir():
        if checkpoint is not None:
            raise InputSpecError(f"{model} is a Hugging Face directory with its own weights; drop --checkpoint")
        module = load_hf_directory(model)
    else:
        module = build_model(model, checkpoint, trust_pickle)
    if adapter is not None:
        module = merge_adapter(module, adapter)
    return exportable(module, task)


def exportable(module, task: str = "default"):
    """`module` as the exporters and the PyTorch runner call it: a transformers model behind
    `HfGraph`, any other module as it is."""
    from ticknorm.exporter.hf import HfGraph, is_hf_model

    if is_hf_model(module):
        return HfGraph(module, task)
    if task == WITH_PAST:
        raise InputSpecError(f"--task {task} needs a Hugging Face decoder; {type(module).__name__} is not a "
                             "transformers model")
    return module


def model_feeds(module, feeds: dict, dynamic_axes: dict, seed: int = 0) -> tuple[dict, dict]:
    """The user's feeds completed with what the model's task needs (masks, decoder ids, a KV cache)."""
    from ticknorm.exporter.hf import HfGraph, complete_inputs

    if isinstance(module, HfGraph):
        return complete_inputs(module, feeds, dynamic_axes, seed=seed)
    return feeds, dynamic_axes


def example_feeds(specs: list[str], npz=None, seed: int = 0, onnx_model=None) -> tuple[dict[str, np.ndarray], dict]:
    """Feeds from `--input` specs or an `.npz`, and the dynamic axes the specs name. With
    `onnx_model`, token-id inputs given without a range span the model's vocabulary."""
    if npz is not None and specs:
        raise InputSpecError("give inputs either as --input specs or as an .npz file, not both")
    if npz is not None:
        return load_npz(npz), {}
    if not specs:
        raise InputSpecError("no inputs: give --input NAME:DIMS:DTYPE (e.g. input_ids:batch=2xseq=16:int64) or --input-file")
    parsed = [parse_input_spec(spec) for spec in specs]
    limits = index_ranges(onnx_model) if onnx_model is not None else None
    return feeds_from_specs(parsed, seed, limits), {s.name: s.dynamic_axes for s in parsed if s.dynamic_axes}


def export(model: str, output, inputs: list[str] = (), input_file=None, checkpoint=None, trust_pickle=False,
           exporter: str = DEFAULT_EXPORTER, opset=None, fuse: bool = True, check: bool = True, report=None,
           external_data_threshold: int = PROTOBUF_LIMIT, seed: int = 0, ln_target: str = "native",
           rms_target: str = "auto", adapter=None, task: str = "default", progress=lambda m: None) -> ExportResult:
    """Export, fuse, verify and compare with PyTorch. A decoder exported `--task
    text-generation-with-past` is also compared on a prefill and two decode steps."""
    from ticknorm.exporter.hf import generation_checks

    feeds, dynamic_axes = example_feeds(list(inputs), input_file, seed)
    progress("loading the model")
    module = load_model(model, checkpoint, trust_pickle, adapter, task)
    feeds, dynamic_axes = model_feeds(module, feeds, dynamic_axes, seed)
    extra_checks = generation_checks(module, feeds, seed=seed) if task == WITH_PAST and check else ()
    result = export_model(module, feeds, output, exporter=exporter, opset=opset, dynamic_axes=dynamic_axes,
                          fuse=fuse, check=check, external_data_threshold=external_data_threshold,
                          ln_target=ln_target, rms_target=rms_target, extra_checks=extra_checks, progress=progress)
    if report is not None and result.fusion is not None:
        write_text(report, result.fusion.to_json())
    return result


def fuse(source, output, opset=None, inputs: list[str] = (), input_file=None, verify: bool = True, report=None,
         seed: int = 0, ln_target: str = "native", rms_target: str = "auto") -> tuple[FusionResult, PluginTargetResult | None]:
    """Fuse and verify (on the native graph, which ONNX Runtime runs), then retarget to the plugin
    when asked: the plugin result comes second, None for the native target."""
    model = load_onnx(source)
    feeds = example_feeds(list(inputs), input_file, seed)[0] if (inputs or input_file) else None
    targets = NormTargets(rms=rms_target, plugin=ln_target == "plugin")
    result = fuse_norms(model, opset=opset, verify=verify, feeds=feeds, targets=targets)
    retargeted = to_plugin_target(result.model) if ln_target == "plugin" else None
    save_onnx(retargeted.model if retargeted else result.model, output)
    if report is not None:
        write_text(report, result.report.to_json())
    return result, retargeted


def inspect(source) -> ModelSummary:
    return summarize(load_onnx(source))


def _exported_and_reference(source, model, inputs, input_file, checkpoint, trust_pickle, seed,
                            progress=lambda m: None, adapter=None):
    """The ONNX model, the PyTorch model it came from, and feeds for both: what every command that
    judges an export against PyTorch starts with."""
    onnx_model = load_onnx(source)
    feeds, axes = example_feeds(list(inputs), input_file, seed, onnx_model)
    progress("loading the model")
    module = load_model(model, checkpoint, trust_pickle, adapter, task_of_graph(i.name for i in onnx_model.graph.input))
    return onnx_model, module, model_feeds(module, feeds, axes, seed)[0]


def runtimes() -> list:
    return runtime_statuses()


def compare(source, model: str, inputs: list[str] = (), input_file=None, checkpoint=None, trust_pickle=False,
            runtimes=("ort",), tolerance: Tolerance | None = None, per_layer: bool = False, depth=None, pattern=None,
            seed: int = 0, ort_optimization: str = "all", progress=lambda m: None,
            adapter=None) -> tuple[CompareReport, list]:
    """PyTorch vs each runtime. Returns the report and the LayerNorms that overflow fp16 (looked for
    when a runtime runs in fp16; TensorRT keeps those in fp32)."""
    onnx_model, module, feeds = _exported_and_reference(source, model, inputs, input_file, checkpoint, trust_pickle,
                                                         seed, progress, adapter)
    overflows = []
    if any(r.endswith("fp16") for r in runtimes):
        progress("looking for LayerNorms that overflow fp16")
        overflows = fp16_overflows(onnx_model, feeds)
    report = compare_models(onnx_model, module, feeds, runtimes, tolerance, per_layer, depth, pattern,
                            profile_for(onnx_model, feeds), TrtSettings(fp32_layers=[row.node for row in overflows]),
                            [row.module for row in overflows], ort_optimization, progress)
    return report, overflows


def drift_snapshot(source, model: str, output, inputs: list[str] = (), input_file=None, checkpoint=None,
                   trust_pickle=False, tolerance: Tolerance | None = None, depth=None, pattern=None, seed: int = 0,
                   adapter=None):
    onnx_model, module, feeds = _exported_and_reference(source, model, inputs, input_file, checkpoint, trust_pickle,
                                                         seed, adapter=adapter)
    return snapshot(onnx_model, module, feeds, output, tolerance, depth, pattern)


def drift_check(bundle, source, runtime: str = "ort", allow_model_change: bool = False) -> DriftReport:
    return check(bundle, load_onnx(source), runtime, allow_model_change)


def drift_history(bundle, plot=None) -> list[dict]:
    entries = history(bundle)
    if plot is not None:
        plot_history(entries, plot)
    return entries


def profile(source, model: str, inputs: list[str] = (), input_file=None, checkpoint=None, trust_pickle=False,
            runtimes=("torch", "ort"), iterations: int = 20, warmup: int = 3, depth=None, seed: int = 0,
            on_iteration=lambda: None, progress=lambda m: None, adapter=None) -> ProfileResult:
    onnx_model, module, feeds = _exported_and_reference(source, model, inputs, input_file, checkpoint, trust_pickle,
                                                         seed, progress, adapter)
    return run_profile(onnx_model, module, feeds, runtimes, iterations, warmup, depth, profile_for(onnx_model, feeds),
                       on_iteration)


def report(source, model: str, output, inputs: list[str] = (), input_file=None, checkpoint=None, trust_pickle=False,
           runtimes=("torch", "ort"), iterations: int = 20, warmup: int = 3, depth=None, tolerance=None,
           json_path=None, seed: int = 0, on_iteration=lambda: None, progress=lambda m: None,
           adapter=None) -> list[JoinedRow]:
    """Latency and error per module on one row: profile every runtime, compare every non-torch
    runtime with PyTorch per module at the same depth, write HTML (and JSON)."""
    onnx_model, module, feeds = _exported_and_reference(source, model, inputs, input_file, checkpoint, trust_pickle,
                                                         seed, progress, adapter)
    shapes = profile_for(onnx_model, feeds)
    timings = run_profile(onnx_model, module, feeds, runtimes, iterations, warmup, depth, shapes, on_iteration)
    progress("comparing every module with PyTorch")
    targets = [r for r in runtimes if r != "torch"]
    accuracy = compare_models(onnx_model, module, feeds, targets, tolerance, True, depth, None, shapes)
    rows = join(timings, accuracy)
    write_html(rows, timings, accuracy, output, f"ticknorm report: {Path(source).name}")
    if json_path is not None:
        write_joined_json(rows, json_path)
    return rows
