"""`ticknorm` command line: parse, call one function of `ticknorm.api`, print, exit.

Exit codes: 0 pass, 1 an accuracy failure, 2 a usage or environment error. Errors are one line
on stderr; set TICKNORM_DEBUG=1 to see the traceback of an unexpected one.
"""

import functools
import os
import sys

import click

from ticknorm import api
from ticknorm.base.atomic import write_text
from ticknorm.report import profile_outputs
from ticknorm.base.errors import InputSpecError, TicknormError, first_line
from ticknorm.exporter.export import DEFAULT_EXPORTER, EXPORTERS
from ticknorm.exporter.fusion import RMS_TARGETS
from ticknorm.exporter.plugin_target import LN_TARGETS
from ticknorm.exporter.tasks import TASKS
from ticknorm.runtime.ort_runner import OPTIMIZATION_LEVELS
from ticknorm.validate.compare import Tolerance


def _one_line_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TicknormError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # noqa: BLE001 - the CLI never shows a traceback unasked
            if os.environ.get("TICKNORM_DEBUG"):
                raise
            click.echo(f"error: unexpected {type(exc).__name__}: {first_line(exc)} "
                       "(set TICKNORM_DEBUG=1 for the traceback)", err=True)
            sys.exit(2)
    return wrapper


def _progress(message: str) -> None:
    click.echo(f"... {message}", err=True)


def input_options(command):
    """`--input` specs or `--input-file`, shared by every command that feeds a model."""
    command = click.option("--input-file", type=click.Path(dir_okay=False), default=None,
                           help=".npz with one array per input name.")(command)
    command = click.option("--input", "inputs", multiple=True, metavar="NAME:DIMS[:DTYPE[:LOW..HIGH]]",
                           help="e.g. input_ids:batch=2xseq=16:int64:0..30522 (repeat per input; NAME=SIZE makes an axis dynamic).")(command)
    return click.option("--seed", type=int, default=0, show_default=True, help="Seed for random inputs.")(command)


def model_options(command):
    """How to build the PyTorch reference; the same on every command that needs it."""
    command = click.option("--trust-pickle", is_flag=True,
                           help="Allow checkpoints that unpickle objects (whole models, TorchScript); this runs code from the file.")(command)
    command = click.option("--adapter", type=click.Path(file_okay=False), default=None,
                           help="A PEFT/LoRA adapter folder (save_pretrained), merged into the model first.")(command)
    command = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                           help="Weights: .pt/.pth/.bin state dict (wrappers and DDP prefixes handled) or .safetensors.")(command)
    return click.option("--model", "model", required=True, metavar="FACTORY|HF_DIR",
                        help="pkg.module:fn or path/file.py:fn returning an nn.Module, or a save_pretrained directory.")(command)


def ln_target_option(command):
    return click.option("--ln-target", type=click.Choice(LN_TARGETS), default="native", show_default=True,
                        help="native: ONNX LayerNormalization (every runtime, TensorRT's own layer); plugin: "
                             "ticknorm::LayerNorm, our kernel as a TensorRT plugin (TensorRT only).")(command)


def rms_target_option(command):
    return click.option("--rms-target", type=click.Choice(RMS_TARGETS), default="auto", show_default=True,
                        help="RMSNorms become: auto: RMSNormalization at opset 23+, ONNX Runtime's "
                             "SimplifiedLayerNormalization below; onnx: RMSNormalization only (left decomposed "
                             "below 23); ort: SimplifiedLayerNormalization at any opset (ONNX Runtime only).")(command)


@click.group()
@click.version_option(package_name="ticknorm")
def main():
    """Export PyTorch models to ONNX with fused LayerNorms, and prove they are still the same model."""


@main.command()
@model_options
@input_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--exporter", type=click.Choice(sorted(EXPORTERS)), default=DEFAULT_EXPORTER, show_default=True)
@click.option("--opset", type=int, default=None, help="dynamo: 18+, torchscript: 13-17 (default 17).")
@click.option("--no-fuse", is_flag=True, help="Keep decomposed LayerNorms as exported.")
@click.option("--no-check", is_flag=True, help="Skip the PyTorch vs ONNX Runtime comparison.")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write the fusion report as JSON.")
@click.option("--external-data-threshold", type=int, default=api.PROTOBUF_LIMIT, show_default=True,
              help="Bytes of weights above which they go to OUTPUT.data.")
@click.option("--task", type=click.Choice(TASKS), default="default", show_default=True,
              help="Hugging Face models: default (no cache) or text-generation-with-past (a decoder step with "
                   "past_key_values.N.key/value in and present.N.* out), as Optimum names them.")
@ln_target_option
@rms_target_option
@_one_line_errors
def export(model, checkpoint, adapter, trust_pickle, inputs, input_file, seed, output, exporter, opset, no_fuse,
           no_check, report, external_data_threshold, task, ln_target, rms_target):
    """Export a model to ONNX, fuse every LayerNorm, verify, and compare with PyTorch."""
    result = api.export(model, output, inputs, input_file, checkpoint, trust_pickle, exporter, opset,
                        fuse=not no_fuse, check=not no_check, report=report,
                        external_data_threshold=external_data_threshold, seed=seed, ln_target=ln_target,
                        rms_target=rms_target, adapter=adapter, task=task, progress=_progress)
    click.echo(f"wrote {', '.join(str(f) for f in result.files)} ({result.exporter} exporter, opset {result.opset})")
    if result.fusion is not None:
        click.echo(result.fusion.summary())
    if result.plugin_target is not None:
        click.echo(result.plugin_target.summary())
    if result.accuracy:
        click.echo("PyTorch vs ONNX Runtime (CPU):")
        for check in result.accuracy:
            click.echo("  " + check.line())


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--opset", type=int, default=None, help="Opset of the result (17+ for LayerNormalization, 23+ for RMSNormalization).")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write the fusion report as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime check of the fused graph (not recommended).")
@input_options
@ln_target_option
@rms_target_option
@_one_line_errors
def fuse(source, output, opset, report, no_verify, inputs, input_file, seed, ln_target, rms_target):
    """Rewrite decomposed LayerNorms (and RMSNorms) in an ONNX file into single nodes."""
    result, retargeted = api.fuse(source, output, opset, inputs, input_file, verify=not no_verify, report=report,
                                  seed=seed, ln_target=ln_target, rms_target=rms_target)
    click.echo(f"wrote {output}")
    click.echo(result.report.summary())
    if retargeted is not None:
        click.echo(retargeted.summary())


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_one_line_errors
def inspect(source, as_json):
    """Opset, inputs, outputs, op histogram, LayerNorms fused and not, scope coverage."""
    summary = api.inspect(source)
    click.echo(summary.to_json() if as_json else summary.text())


def _tolerance(atol: float, rtol: float, output_tol: tuple) -> Tolerance:
    per_output = {}
    for item in output_tol:
        name, _, values = item.partition(":")
        try:
            low, high = (float(v) for v in values.split(":"))
        except ValueError:
            raise InputSpecError(f"--output-tol '{item}' is not NAME:ATOL:RTOL") from None
        per_output[name] = (low, high)
    return Tolerance(atol, rtol, per_output)


def tolerance_options(command):
    command = click.option("--output-tol", multiple=True, metavar="NAME:ATOL:RTOL", help="Tolerance for one output.")(command)
    command = click.option("--rtol", type=float, default=1e-3, show_default=True)(command)
    return click.option("--atol", type=float, default=1e-4, show_default=True)(command)


def tap_options(command):
    command = click.option("--modules", "pattern", default=None, metavar="GLOB",
                           help="Only tap modules whose path matches, e.g. 'encoder.layer.*.output'.")(command)
    return click.option("--depth", type=int, default=None, help="Only tap modules at most this many path segments deep.")(command)


@main.command()
@_one_line_errors
def runtimes():
    """Each runtime, its version, and why an unavailable one is unavailable."""
    for status in api.runtimes():
        state = "available" if status.available else f"unavailable: {status.reason}"
        click.echo(f"{status.name:<12} {status.version:<16} {state}")


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@model_options
@input_options
@click.option("--runtime", "runtime_list", default="ort", show_default=True,
              help="Comma-separated: ort, ort-cuda, trt, trt-fp16, trt-bf16, torch-fp16, torch-bf16, torch-cuda[-fp16].")
@tolerance_options
@click.option("--per-layer", is_flag=True, help="Also compare every module's output, in model order.")
@click.option("--ort-optimization", type=click.Choice(OPTIMIZATION_LEVELS), default="all", show_default=True,
              help="ONNX Runtime graph optimization level.")
@tap_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON.")
@_one_line_errors
def compare(source, model, checkpoint, adapter, trust_pickle, inputs, input_file, seed, runtime_list, atol, rtol, output_tol,
            per_layer, ort_optimization, depth, pattern, json_path):
    """Compare runtimes with the PyTorch model, per output and per module. Exit 1 on failure."""
    report, overflows = api.compare(source, model, inputs, input_file, checkpoint, trust_pickle, _runtimes(runtime_list),
                                    _tolerance(atol, rtol, output_tol), per_layer, depth, pattern, seed,
                                    ort_optimization, _progress, adapter=adapter)
    for row in overflows:
        click.echo(f"fp16 overflow: {row.module or row.node}: {row.reason} -> kept in fp32 (TensorRT and torch fp16)")
    click.echo(report.text())
    if json_path:
        write_text(json_path, report.to_json())
    sys.exit(0 if report.passed else 1)


def _profile_options(command):
    command = click.option("--depth", type=int, default=None, help="Roll modules up to this many path segments.")(command)
    command = click.option("--warmup", type=int, default=3, show_default=True, help="Iterations dropped first.")(command)
    command = click.option("--iterations", type=int, default=20, show_default=True)(command)
    return click.option("--runtime", "runtime_list", default="torch,ort", show_default=True,
                        help="Comma-separated: torch, ort, ort-cuda, trt, trt-fp16, torch-cuda, ...")(command)


def _runtimes(runtime_list: str) -> list[str]:
    return [r.strip() for r in runtime_list.split(",") if r.strip()]


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@model_options
@input_options
@_profile_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None)
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), default=None,
              help="Chrome/Perfetto trace, one track per runtime.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Bars per module, PNG.")
@_one_line_errors
def profile(source, model, checkpoint, adapter, trust_pickle, inputs, input_file, seed, runtime_list, iterations, warmup, depth,
            json_path, csv_path, trace_path, plot_path):
    """Per-module latency on every runtime, aligned on PyTorch modules."""
    runtimes_ = _runtimes(runtime_list)
    with click.progressbar(length=iterations * len(runtimes_), label="profiling", file=sys.stderr) as bar:
        result = api.profile(source, model, inputs, input_file, checkpoint, trust_pickle, runtimes_, iterations,
                             warmup, depth, seed, on_iteration=lambda: bar.update(1), adapter=adapter)
    click.echo(profile_outputs.table(result))
    for path, write in ((json_path, profile_outputs.write_json), (csv_path, profile_outputs.write_csv),
                        (trace_path, profile_outputs.write_trace), (plot_path, profile_outputs.write_plot)):
        if path:
            write(result, path)
            click.echo(f"wrote {path}")


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@model_options
@input_options
@_profile_options
@tolerance_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The HTML file to write.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="The same rows as JSON.")
@_one_line_errors
def report(source, model, checkpoint, adapter, trust_pickle, inputs, input_file, seed, runtime_list, iterations, warmup, depth,
           atol, rtol, output_tol, output, json_path):
    """One HTML page: per module, latency and error against PyTorch on every runtime."""
    runtimes_ = _runtimes(runtime_list)
    with click.progressbar(length=iterations * len(runtimes_), label="profiling", file=sys.stderr) as bar:
        rows = api.report(source, model, output, inputs, input_file, checkpoint, trust_pickle, runtimes_, iterations,
                          warmup, depth, _tolerance(atol, rtol, output_tol), json_path, seed,
                          on_iteration=lambda: bar.update(1), adapter=adapter)
    flagged = [row.module for row in rows if row.flagged]
    click.echo(f"wrote {output}: {len(rows)} modules, {len(flagged)} slow and inaccurate"
               + (f" ({', '.join(flagged[:5])})" if flagged else ""))


@main.group()
def drift():
    """Golden bundles: snapshot once, check in CI, watch the history."""


@drift.command("snapshot")
@click.argument("source", type=click.Path(dir_okay=False))
@model_options
@input_options
@tolerance_options
@tap_options
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@_one_line_errors
def drift_snapshot(source, model, checkpoint, adapter, trust_pickle, inputs, input_file, seed, atol, rtol, output_tol, depth,
                   pattern, output):
    """Write a golden bundle: inputs, PyTorch outputs, per-module statistics, tolerances, versions."""
    bundle = api.drift_snapshot(source, model, output, inputs, input_file, checkpoint, trust_pickle,
                                _tolerance(atol, rtol, output_tol), depth, pattern, seed, adapter=adapter)
    click.echo(f"wrote bundle {bundle}")


@drift.command("check")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--runtime", default="ort", show_default=True)
@click.option("--allow-model-change", is_flag=True, help="Check a model whose hash differs from the bundle's.")
@_one_line_errors
def drift_check(bundle, source, runtime, allow_model_change):
    """Re-run on the bundle's inputs and compare; exit 1 with a table if anything drifted."""
    report = api.drift_check(bundle, source, runtime, allow_model_change)
    click.echo(report.text())
    sys.exit(0 if report.passed else 1)


@drift.command("history")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Draw the history to a PNG.")
@_one_line_errors
def drift_history(bundle, plot):
    """List past checks; --plot draws error per output and per module over time."""
    entries = api.drift_history(bundle, plot)
    for entry in entries:
        worst = max(entry["outputs"].values(), default=0.0)
        click.echo(f"{entry['time']}  {entry['runtime']:<10} {'pass' if entry['passed'] else 'DRIFT':<6} "
                   f"max output error {worst:.3g}  model {entry['model_hash'][:12]}")
    if plot:
        click.echo(f"wrote {plot}")


if __name__ == "__main__":
    main()
