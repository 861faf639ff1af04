"""`ticknorm` command line: parse, call one function of `ticknorm.api`, print, exit.

Exit codes: 0 pass, 1 an accuracy failure, 2 a usage or environment error. Errors are one line
on stderr; set TICKNORM_DEBUG=1 to see the traceback of an unexpected one.
"""

import dataclasses
import functools
import json
import os
import sys
import warnings
from typing import TYPE_CHECKING

import click

from ticknorm import api
from ticknorm.base.atomic import check_writable, check_writable_folder, write_text
from ticknorm.base.errors import InputSpecError, TicknormError, TicknormWarning, first_line
from ticknorm.base.inputs import Inputs
from ticknorm.base.metrics import CHECK_RULES, Tolerance
from ticknorm.base.onnx_io import PROTOBUF_LIMIT
from ticknorm.base.precision import PRECISIONS, Precision
from ticknorm.base.progress import Progress
from ticknorm.base.run_results import read_reference
from ticknorm.base.scopes import LayerSelection
from ticknorm.exporter.attention_target import ATTENTION_TARGETS, PLAIN
from ticknorm.exporter.export import DEFAULT_EXPORTER, EXPORTERS, ExportOptions
from ticknorm.exporter.fusion import RMS_TARGETS, NormTargets
from ticknorm.exporter.model_ref import ModelRef
from ticknorm.exporter.plugin_target import LN_TARGETS
from ticknorm.exporter.precision.convert import Conversion
from ticknorm.exporter.streaming import STREAMING
from ticknorm.exporter.tasks import TASKS
from ticknorm.profiler.profile import Timing
from ticknorm.report import joined, profile_outputs
from ticknorm.runtime.ort_runner import OPTIMIZATION_LEVELS
from ticknorm.runtime.registry import Runtimes, TrtexecFiles, runtime_patterns
from ticknorm.validate.drift import GoldenSources
from ticknorm.ticks.ranges import DEFAULT_HEADROOM

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar  # what click.progressbar returns; click exports no name for it


class OneLineErrors(click.Group):
    """Every command's failure as one line on stderr and an exit code: 1 for wrong numbers, 2 for a
    request that could not be carried out; click's own usage errors pass through as click says them.
    ticknorm's own warnings (work that went on without something) are one line too."""

    def invoke(self, ctx):
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            try:
                return super().invoke(ctx)
            except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise
            except TicknormError as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(exc.exit_code)
            except Exception as exc:  # noqa: BLE001 - the CLI never shows a traceback unasked
                if os.environ.get("TICKNORM_DEBUG"):
                    raise
                click.echo(f"error: unexpected {type(exc).__name__}: {first_line(exc)} "
                           "(set TICKNORM_DEBUG=1 for the traceback)", err=True)
                sys.exit(2)


def _one_line_warnings(show):
    def shown(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TicknormWarning):
            click.echo(f"warning: {message}", err=True)
        else:
            show(message, category, filename, lineno, file, line)
    return shown


class OutputPath(click.Path):
    """A path the command will write: checked when the command line is read, before any work, so
    a read-only folder or a parent that is a file is found in a second, not after an hour."""

    def __init__(self, folder: bool = False):
        super().__init__(file_okay=not folder, dir_okay=folder)
        self.folder = folder

    def convert(self, value, param, ctx):
        what = f"{param.opts[-1] if param is not None else 'output'}"
        (check_writable_folder if self.folder else check_writable)(value, what)
        return super().convert(value, param, ctx)


OUTPUT_FILE, OUTPUT_FOLDER = OutputPath(), OutputPath(folder=True)


def _say(message: str) -> None:
    click.echo(f"... {message}", err=True)


def grouped(name: str, build, *options):
    """Click options whose values become one parameter object, built here once: the command gets
    `name=build(**values)` instead of one argument per option."""
    def decorate(command):
        def wrapper(**kwargs):
            values = {key: kwargs.pop(key) for key in keys}
            return command(**kwargs, **{name: build(**values)})

        functools.update_wrapper(wrapper, command)
        before = len(getattr(wrapper, "__click_params__", []))
        for option in reversed(options):
            wrapper = option(wrapper)
        keys = [param.name for param in getattr(wrapper, "__click_params__", [])[before:]]
        return wrapper
    return decorate


input_options = grouped(
    "inputs", lambda inputs, input_file, seed: Inputs(tuple(inputs), input_file, seed),
    click.option("--input", "inputs", multiple=True, metavar="NAME:DIMS[:DTYPE[:LOW..HIGH]]",
                 help="e.g. input_ids:batch=2xseq=16:int64:0..30522 (repeat per input; NAME=SIZE makes an axis "
                      "dynamic; on an ONNX file the dtype defaults to the graph's). Commands that read an ONNX file "
                      "build the inputs not given from the graph: its shapes, index ranges and a decoder's cache, "
                      "the sizes chosen said in one line."),
    click.option("--input-file", type=click.Path(), default=None,
                 help=".npz with one array per input name, Polygraphy's inputs JSON (every iteration), or a bundle "
                      "folder."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for random inputs."))

def _model_options(required: bool):
    """The options that name the PyTorch model; optional where saved outputs can stand in for it."""
    return grouped(
        "model", lambda model_source, **loading: ModelRef(model_source, **loading) if model_source else None,
        click.option("--model", "model_source", required=required, metavar="FACTORY|HF_DIR",
                     help="pkg.module:fn or path/file.py:fn returning an nn.Module, or a save_pretrained directory."),
        click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     help="Weights: .pt/.pth/.bin state dict (wrappers, DDP and PEFT prefixes handled), .safetensors, "
                          "or a sharded checkpoint's model.safetensors.index.json (read a shard at a time), for the "
                          "factory's model or the HF_DIR's architecture; bf16/fp16 weights run the model in their "
                          "type."),
        click.option("--adapter", type=click.Path(file_okay=False), default=None,
                     help="A PEFT/LoRA adapter folder (save_pretrained), merged into the model first."),
        click.option("--adapter-config", type=click.Path(dir_okay=False), default=None,
                     help="The adapter_config.json whose lora_alpha / r scale the LoRA weights of a --checkpoint saved "
                          "from a PEFT-wrapped model (default: one beside the checkpoint); they are merged in."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow checkpoints that unpickle objects (whole models, TorchScript); this runs code from "
                          "the file."))


model_options = _model_options(required=True)

_REFERENCE = click.option(
    "--reference", "reference_choice", default=None, metavar="RUNTIME|FILE.onnx",
    help="Without --model: what the file is judged against (default: the file itself in fp32 on ONNX Runtime CPU, "
         "graph optimizations off): a runtime, or another .onnx file (e.g. the fp32 export beside an fp16 one).")

reference_options = grouped(
    "reference", lambda reference_outputs, reference_runner, reference_choice: _reference(
        reference_outputs, reference_runner, reference_choice),
    _REFERENCE,
    click.option("--reference-outputs", type=click.Path(dir_okay=False), default=None,
                 help="Judge the outputs against Polygraphy RunResults (polygraphy run --save-outputs) instead of "
                      "PyTorch; --model is then optional and --input-file gives the inputs they were made from."),
    click.option("--reference-runner", default=None, metavar="NAME",
                 help="The runner in --reference-outputs to use (default: 'torch', else its only one)."))


def _reference(outputs, runner, choice):
    """Polygraphy's saved outputs, or what --reference names for a file judged alone, or None."""
    if outputs is not None and choice is not None:
        raise InputSpecError("--reference and --reference-outputs both name the reference: give one")
    if outputs is not None:
        return read_reference(outputs, runner)
    if runner is not None:
        raise InputSpecError("--reference-runner picks a runner in --reference-outputs: give that file too")
    return choice


_LN_TARGET = click.option("--ln-target", type=click.Choice(LN_TARGETS), default="native", show_default=True,
                          help="native: ONNX LayerNormalization (every runtime, TensorRT's own layer); plugin: "
                               "ticknorm::LayerNorm, our kernel as a TensorRT plugin (TensorRT only).")
_RMS_TARGET = click.option("--rms-target", type=click.Choice(RMS_TARGETS), default="auto", show_default=True,
                           help="RMSNorms become: auto: RMSNormalization at opset 23+, ONNX Runtime's "
                                "SimplifiedLayerNormalization below; onnx: RMSNormalization only (left decomposed "
                                "below 23); ort: SimplifiedLayerNormalization at any opset (ONNX Runtime only).")

norm_target_options = grouped(
    "targets", lambda ln_target, rms_target: NormTargets(rms=rms_target, plugin=ln_target == "plugin"),
    _LN_TARGET, _RMS_TARGET)

_KEEP_FP32 = click.option("--keep-fp32", multiple=True, metavar="GLOB",
                          help="Keep in fp32 the nodes whose module path or ONNX node name matches (repeat), e.g. "
                               "'encoder.layer.*.output' or 'model/dense_1/*'; op:GLOB matches op types, e.g. "
                               "op:Softmax.")
_ALLOW_PARTIAL = click.option(
    "--allow-partial", is_flag=True,
    help="With --precision: exit 0 though less than half of the float weights (by size) took the low type; "
         "without it such a conversion exits 1, the file still written.")
_CALIBRATION_HELP = "A ticks file recorded while the model trained (ticknorm.ticks.Recorder): {}"
_PRECISION_OPTIONS = (
    click.option("--precision", "dtype", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                 help="Weights and activations in this type, with fp32 islands chosen from a measured fp32 run."),
    click.option("--io-types", type=click.Choice(("fp32", "low")), default="fp32", show_default=True,
                 help="Graph inputs and outputs: fp32, or the low type."),
    _KEEP_FP32,
    click.option("--calibration", type=click.Path(dir_okay=False), default=None, metavar="TICKS.jsonl",
                 help=_CALIBRATION_HELP.format("a norm whose recorded input, output or mean of squares passed the low "
                                               "type's max also stays in fp32.")))


def _precision(dtype: str, io_types: str, keep_fp32: tuple, calibration=None) -> Precision:
    return Precision(dtype, io_types, tuple(keep_fp32), calibration=calibration)


precision_options = grouped("precision", _precision, *_PRECISION_OPTIONS)

export_options = grouped(
    "options", lambda no_fuse, no_check, dtype, io_types, keep_fp32, calibration, **values: ExportOptions(
        fuse=not no_fuse, check=not no_check, precision=_precision(dtype, io_types, keep_fp32, calibration), **values),
    click.option("--exporter", type=click.Choice(sorted(EXPORTERS)), default=DEFAULT_EXPORTER, show_default=True,
                 help="torch.onnx's exporter; TorchScript is also the fallback when dynamo cannot capture."),
    click.option("--opset", type=int, default=None, help="dynamo: 18+, torchscript: 13-17 (default 17)."),
    click.option("--no-fuse", is_flag=True, help="Keep decomposed LayerNorms as exported."),
    click.option("--no-check", is_flag=True, help="Skip the PyTorch vs ONNX Runtime comparison."),
    click.option("--external-data-threshold", type=int, default=PROTOBUF_LIMIT, show_default=True,
                 help="Bytes of weights above which they go to OUTPUT.data."),
    click.option("--task", type=click.Choice(TASKS), default="default", show_default=True,
                 help="Hugging Face models: default (no cache), text-generation-with-past (a decoder step with "
                      "past_key_values.N.key/value in and present.N.* out) or text2text-generation-with-past (an "
                      "encoder-decoder's decoder step: encoder_hidden_states, encoder_attention_mask and "
                      "past_key_values.N.decoder/encoder.key/value in), as Optimum names them."),
    click.option("--target", type=click.Choice(ATTENTION_TARGETS), default=PLAIN, show_default=True,
                 help="The graph for its runtime: plain (attention as the exporter writes it); ort (ONNX Runtime's "
                      "fused ops: a decoder's GroupQueryAttention with the KV cache and rotary inside, an encoder's "
                      "Attention, Q/K/V packed into one MatMul, RMSNorm as SimplifiedLayerNormalization, residual "
                      "norms in the form its CPU kernels run fastest); onnx (ONNX's own Attention with the KV cache "
                      "inside, opset 23, Q/K/V packed); trt (the plain form, which TensorRT fuses itself). Each fused "
                      "op is checked against its PyTorch module on a prefill and decode steps."),
    click.option("--skip-norms", is_flag=True,
                 help="--target ort: residual Add + norm as ONNX Runtime's Skip(Simplified)LayerNormalization, one "
                      "kernel on CUDA; on CPU their float kernel is scalar (measured 4.5x slower than Add + "
                      "LayerNormalization), so the default keeps them apart."),
    click.option("--streaming", type=click.Choice(STREAMING), default="auto", show_default=True,
                 help="A Hugging Face folder exported from its shards on the meta device and checked block by "
                      "block against PyTorch (each module's weights read as it runs): for models larger than "
                      "memory. auto: when its fp32 weights would not fit in the memory available."),
    _LN_TARGET, _RMS_TARGET, *_PRECISION_OPTIONS)


def _tolerance(atol: float, rtol: float, output_tol: tuple, check_mode: str = "ticknorm") -> Tolerance:
    per_output = {}
    for item in output_tol:
        name, _, values = item.partition(":")
        try:
            low, high = (float(v) for v in values.split(":"))
        except ValueError:
            raise InputSpecError(f"--output-tol '{item}' is not NAME:ATOL:RTOL") from None
        per_output[name] = (low, high)
    return Tolerance(atol, rtol, per_output, check_mode)


_TOLERANCE = (
    click.option("--atol", type=float, default=None,
                 help="Default: by the type the runtime computes in: fp32 1e-4, fp16 2e-2, bf16 2e-1."),
    click.option("--rtol", type=float, default=None, help="Default: fp32 1e-3, fp16 2e-2, bf16 2e-1."),
    click.option("--output-tol", multiple=True, metavar="NAME:ATOL:RTOL", help="Tolerance for one output."),
    click.option("--check-mode", type=click.Choice(CHECK_RULES), default="ticknorm", show_default=True,
                 help="ticknorm: a value passes when |error| <= atol + rtol*|ref|; polygraphy: it fails only when "
                      "|error| > atol and |error|/|ref| > rtol (Polygraphy's default). A bundle keeps its mode."))
tolerance_options = grouped("tolerance", _tolerance, *_TOLERANCE)

_DEPTH = click.option("--depth", type=int, default=None, help="Only tap modules at most this many path segments deep.")
_MODULES = click.option("--modules", "pattern", default=None, metavar="GLOB",
                        help="Only tap modules whose path matches, e.g. 'encoder.layer.*.output'.")
layer_options = grouped("layers", LayerSelection, _DEPTH, _MODULES)
per_layer_options = grouped(
    "layers", lambda per_layer, depth, pattern: LayerSelection(depth, pattern) if per_layer else None,
    click.option("--per-layer", is_flag=True, help="Also compare every module's output, in model order."),
    _DEPTH, _MODULES)

timing_options = grouped(
    "timing", Timing,
    click.option("--iterations", type=int, default=20, show_default=True, help="Timed runs per runtime."),
    click.option("--warmup", type=int, default=3, show_default=True,
                 help="Untimed runs of each kind (plain, instrumented) first; with any, each timed block "
                      "also starts with one untimed run. 0: every run timed, the first one cold."),
    click.option("--depth", type=int, default=None, help="Roll modules up to this many path segments."))


def _trtexec_files(profile, layers, log) -> TrtexecFiles | None:
    if profile is None:
        if layers is not None or log is not None:
            raise InputSpecError("--trtexec-layers and --trtexec-log describe the layers of a --trtexec-profile: "
                                 "give that file too")
        return None
    return TrtexecFiles(profile, layers, log)


def _runtimes(names: str, keep_fp32: tuple, ort_optimization: str = "all", trtexec_profile=None,
              trtexec_layers=None, trtexec_log=None) -> Runtimes:
    return Runtimes(tuple(r.strip() for r in names.split(",") if r.strip()), ort_optimization,
                    Precision(keep_fp32=tuple(keep_fp32)), _trtexec_files(trtexec_profile, trtexec_layers, trtexec_log))


_TRTEXEC = (click.option("--trtexec-profile", type=click.Path(dir_okay=False), default=None,
                         help="trtexec --exportProfile JSON made on the target GPU (see `ticknorm trtexec-command`): "
                              "its layers join the table as 'trt (trtexec)'."),
            click.option("--trtexec-layers", type=click.Path(dir_okay=False), default=None,
                         help="trtexec --exportLayerInfo JSON (--profilingVerbosity=detailed): maps layers to ONNX "
                              "nodes."),
            click.option("--trtexec-log", type=click.Path(dir_okay=False), default=None,
                         help="trtexec's console output (the `| tee` of trtexec-command): TensorRT version, GPU, "
                              "precision and the GPU compute time of its plain runs."))


def runtime_options(default: str, *more, shown: str | None = None):
    """`--runtime` names and how they run: `--keep-fp32` for the low-precision targets. `shown`:
    the default as help says it, where `default` is '' (the command's own choice)."""
    return grouped(
        "runtimes", _runtimes,
        click.option("--runtime", "names", default=default, show_default=shown or True,
                     help=f"Comma-separated: {runtime_patterns()}. An fp32 graph is converted for trt-fp16/-bf16 "
                          "with fp32 islands measured on the inputs."),
        _KEEP_FP32, *more)


@click.group(cls=OneLineErrors)
@click.version_option(package_name="ticknorm")
def main():
    """Export PyTorch models to ONNX with fused LayerNorms, and prove they are still the same model."""


@main.command("export")
@model_options
@input_options
@click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="The .onnx file to write.")
@export_options
@click.option("--report", type=OUTPUT_FILE, default=None,
              help="Write the fusion report (and, with --precision, the fp32 islands and checks) as JSON.")
@_ALLOW_PARTIAL
def export_command(model, inputs, output, options, report, allow_partial):
    """Export a model to ONNX, fuse every LayerNorm, verify, and compare with PyTorch."""
    result = api.export(model, inputs, output, options=options, report=report, progress=Progress(_say))
    click.echo(f"wrote {', '.join(str(f) for f in result.files)} ({result.exporter} exporter, opset {result.opset})")
    for note in result.notes:
        click.echo(note)
    if result.fusion is not None:
        click.echo(result.fusion.summary())
    if result.plugin_target is not None:
        click.echo(result.plugin_target.summary())
    if result.conversion is not None:
        click.echo(result.conversion.summary())
    click.echo(result.precision_line())
    if result.accuracy:
        click.echo("PyTorch vs ONNX Runtime (CPU):")
        for check in result.accuracy:
            click.echo(f"  {check.line()} (atol {check.atol:g}, rtol {check.rtol:g})")
    _refuse_partial(result.conversion, output, allow_partial)


@main.command("fuse")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="The fused .onnx file to write.")
@click.option("--opset", type=int, default=None,
              help="Opset of the result (17+ for LayerNormalization, 23+ for RMSNormalization).")
@click.option("--report", type=OUTPUT_FILE, default=None, help="Write the fusion report as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the ONNX Runtime check of the fused graph (not recommended).")
@click.option("--strict", is_flag=True,
              help="Exit 1 when any decomposed norm is left (refused, or left at this opset); the file is still "
                   "written, with the others fused.")
@input_options
@norm_target_options
def fuse_command(source, output, opset, report, no_verify, strict, inputs, targets):
    """Rewrite decomposed LayerNorms (and RMSNorms) in an ONNX file into single nodes."""
    result, retargeted = api.fuse(source, output, inputs, opset=opset, verify=not no_verify, report=report,
                                   targets=targets)
    click.echo(f"wrote {output}")
    click.echo(result.report.summary())
    if retargeted is not None:
        click.echo(retargeted.summary())
    failure = result.report.strict_failure(output) if strict else None
    if failure is not None:
        click.echo(f"error: {failure}", err=True)
        sys.exit(1)


@main.command("convert")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="The converted .onnx file to write.")
@precision_options
@input_options
@click.option("--report", type=OUTPUT_FILE, default=None,
              help="Write the islands and the checks as JSON.")
@_ALLOW_PARTIAL
def convert_command(source, output, precision, inputs, report, allow_partial):
    """Convert an fp32 ONNX file to fp16 or bf16 with fp32 islands measured on the inputs (or
    seeded random ones), checked against the fp32 graph before anything is written."""
    result = api.convert(source, output, precision, inputs, report=report, progress=Progress(_say))
    click.echo(f"wrote {output}")
    click.echo(result.summary())
    _refuse_partial(result, output, allow_partial)


def _refuse_partial(conversion: Conversion | None, output: str, allowed: bool) -> None:
    """Exit 1 after a conversion that left most of the float weights fp32 (written, as fuse --strict)."""
    failure = conversion.partial_failure(output) if conversion is not None and not allowed else None
    if failure is not None:
        click.echo(f"error: {failure}", err=True)
        sys.exit(1)


@main.command("inspect")
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_command(source, as_json):
    """Opset, inputs, outputs, op histogram, LayerNorms fused and not, scope coverage."""
    summary = api.inspect(source)
    click.echo(summary.to_json() if as_json else summary.text())


@main.command("runtimes")
@click.option("--check", is_flag=True,
              help="Run every available runtime on a small fused LayerNorm model against PyTorch fp32 (and, on a CUDA "
                   "host, ticknorm's kernel and its TensorRT PTX): verdict, max error, median latency. Exit 1 when one "
                   "computes wrong numbers, 2 when one broke or none could run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def runtimes_command(check, as_json):
    """Each runtime, its version, and why an unavailable one is unavailable; --check proves them."""
    if check:
        report = api.check_runtimes(progress=Progress(_say))
        click.echo(report.to_json() if as_json else report.text())
        sys.exit(report.exit_code)
    statuses = api.runtimes()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(status) for status in statuses], indent=2))
        return
    for status in statuses:
        state = "available" if status.available else f"unavailable: {status.reason}"
        click.echo(f"{status.name:<12} {status.version:<16} {state}")


@main.command("compare")
@click.argument("source", type=click.Path(dir_okay=False))
@_model_options(required=False)
@reference_options
@input_options
@runtime_options("ort", click.option("--ort-optimization", type=click.Choice(OPTIMIZATION_LEVELS), default="all",
                                     show_default=True, help="ONNX Runtime graph optimization level."))
@tolerance_options
@per_layer_options
@click.option("--json", "json_path", type=OUTPUT_FILE, default=None, help="Write the report as JSON.")
def compare_command(source, model, reference, inputs, runtimes, tolerance, layers, json_path):
    """Compare runtimes with the PyTorch model (or with saved Polygraphy outputs), per output and
    per module; without --model, with the file itself in fp32 (or --reference), per module or node.
    Exit 1 on failure."""
    report = api.compare(source, model, inputs, runtimes=runtimes, tolerance=tolerance, layers=layers,
                         progress=Progress(_say), reference=reference)
    click.echo(report.text())
    if json_path:
        write_text(json_path, report.to_json())
    sys.exit(0 if report.passed else 1)


@main.command("trtexec-command")
@click.argument("source", type=click.Path(dir_okay=False))
@input_options
@click.option("--prefix", default="trtexec", show_default=True, help="Stem of the profile and layer files it writes.")
def trtexec_command(source, inputs, prefix):
    """The trtexec line to run on the target GPU, whose files `profile --trtexec-profile/--trtexec-layers`
    then read back."""
    click.echo(api.trtexec_line(source, inputs, prefix))


class TimingProgress:
    """Step lines on stderr (what a non-TTY log keeps), and a bar that appears when the timed
    iterations start, not during setup, so its estimate is of the timing alone."""

    def __init__(self, timing: Timing, runtimes: Runtimes):
        self.length = 2 * timing.iterations * len(runtimes.names)  # plain, then instrumented iterations
        self.bar: ProgressBar[int] | None = None

    def __enter__(self) -> Progress:
        return Progress(self.step, self.advance)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.render_finish()

    def step(self, message: str) -> None:
        if self.bar is None:
            _say(message)

    def advance(self) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=self.length, label="timing", file=sys.stderr)
        self.bar.update(1)


_BY_MODEL = "torch,ort; ort without --model"


@main.command("profile")
@click.argument("source", type=click.Path(dir_okay=False))
@_model_options(required=False)
@input_options
@runtime_options("", *_TRTEXEC, shown=_BY_MODEL)
@timing_options
@grouped("files", lambda **paths: {kind: path for kind, path in paths.items() if path},
         click.option("--json", type=OUTPUT_FILE, default=None, help="Write the table as JSON."),
         click.option("--csv", type=OUTPUT_FILE, default=None, help="Write the table as CSV, one row per module."),
         click.option("--trace", type=OUTPUT_FILE, default=None,
                      help="Chrome/Perfetto trace, one track per runtime."),
         click.option("--plot", type=OUTPUT_FILE, default=None, help="Bars per module, PNG."))
def profile_command(source, model, inputs, runtimes, timing, files):
    """Per-module latency on every runtime, aligned on PyTorch modules (without --model, on the
    file's own modules, or its nodes where it names none)."""
    with TimingProgress(timing, runtimes) as progress:
        result = api.profile(source, model, inputs, runtimes=runtimes, timing=timing, progress=progress)
    click.echo(profile_outputs.table(result))
    for kind, path in files.items():
        profile_outputs.WRITERS[kind](result, path)
        click.echo(f"wrote {path}")


@main.command("report")
@click.argument("source", type=click.Path(dir_okay=False))
@_model_options(required=False)
@input_options
@runtime_options("", *_TRTEXEC, shown=_BY_MODEL)
@timing_options
@grouped("judging", lambda reference_choice, **tolerance: api.Judging(_tolerance(**tolerance), reference_choice),
         _REFERENCE, *_TOLERANCE)
@click.option("-o", "--output", required=True, type=OUTPUT_FILE, help="The HTML file to write.")
@click.option("--json", "json_path", type=OUTPUT_FILE, default=None,
              help="The same report as JSON (rows, verdict, tolerances, versions, model digest, inputs).")
def report_command(source, model, inputs, runtimes, timing, judging, output, json_path):
    """One HTML page: per module, latency and error against PyTorch on every runtime (without
    --model, against the file itself in fp32, or --reference). Exit 1 when a runtime's outputs fail
    tolerance."""
    with TimingProgress(timing, runtimes) as progress:
        report = api.report(source, model, inputs, output, runtimes=runtimes, timing=timing, judging=judging,
                            progress=progress)
    if json_path is not None:
        joined.write_json(report, json_path)
    flagged = [row.module for row in report.rows if row.flagged]
    click.echo(f"wrote {output}: {len(report.rows)} {report.accuracy.unit}s, {len(flagged)} slow and inaccurate"
               + (f" ({', '.join(flagged[:5])})" if flagged else "") + f"; {'PASS' if report.passed else 'FAIL'}")
    sys.exit(0 if report.passed else 1)


@main.group()
def drift():
    """Golden bundles: snapshot once, check in CI, watch the history."""


@drift.command("snapshot")
@click.argument("source", type=click.Path(dir_okay=False))
@_model_options(required=False)
@reference_options
@input_options
@tolerance_options
@layer_options
@click.option("-o", "--output", required=True, type=OUTPUT_FOLDER, help="Bundle folder to write.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None, metavar="TICKS.jsonl",
              help=_CALIBRATION_HELP.format("each norm's peak ranges are kept in bundle.json beside the statistics."))
def drift_snapshot(source, model, reference, inputs, tolerance, layers, output, calibration):
    """Write a golden bundle: inputs, PyTorch outputs (or Polygraphy's saved ones, or without
    --model the file's own in fp32, or --reference's), per-module statistics, tolerances, versions,
    the norms' training ranges with --calibration, and the manifest that makes it one unit."""
    bundle = api.snapshot(source, model, inputs, output, tolerance=tolerance, layers=layers, progress=Progress(_say),
                          sources=GoldenSources(reference, calibration))
    click.echo(f"wrote bundle {bundle}")


@drift.command("check")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--runtime", default="ort", show_default=True,
              help=f"The runtime to re-run the bundle on: {runtime_patterns()}.")
@click.option("--allow-model-change", is_flag=True, help="Check a model whose hash differs from the bundle's.")
@click.option("--no-history", is_flag=True, help="Do not append the verdict to the bundle's history.jsonl "
                                                 "(a read-only checkout).")
def drift_check(bundle, source, runtime, allow_model_change, no_history):
    """Re-run on the bundle's inputs and compare; exit 1 with a table if anything drifted."""
    report = api.check(bundle, source, runtime=runtime, allow_model_change=allow_model_change, progress=Progress(_say),
                       record=not no_history)
    click.echo(report.text())
    sys.exit(0 if report.passed else 1)


@drift.command("history")
@click.argument("bundle", type=click.Path(file_okay=False))
@click.option("--plot", type=OUTPUT_FILE, default=None, help="Draw the history to a PNG.")
def drift_history(bundle, plot):
    """List past checks; --plot draws error per output and per module over time."""
    found = api.history(bundle, plot)
    if found.damaged:
        click.echo(f"warning: skipped {len(found.damaged)} damaged line(s) of history.jsonl (line "
                   f"{', '.join(map(str, found.damaged[:10]))}): a killed append or an edit", err=True)
    for entry in found.entries:
        worst = max(entry["outputs"].values(), default=0.0)
        click.echo(f"{entry['time']}  {entry['runtime']:<10} {'pass' if entry['passed'] else 'DRIFT':<6} "
                   f"max output error {worst:.3g}  model {entry['model_hash'][:12]}")
    if plot:
        click.echo(f"wrote {plot}")


@main.group()
def ticks():
    """Norm ranges recorded while a model trains (ticknorm.ticks.Recorder)."""


@ticks.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--plot", type=OUTPUT_FILE, default=None,
              help="Draw each module's absmax over the steps to a PNG (log scale, fp16's max and the headroom marked).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of the table.")
@click.option("--headroom", type=click.FloatRange(min=1.0), default=DEFAULT_HEADROOM, show_default=True,
              help="Flag the modules whose absmax passes fp16's max divided by this.")
def ticks_show(path, plot, as_json, headroom):
    """Per module: its range over the training steps, which modules approach fp16 overflow and
    which pass it, from which step."""
    summary = api.show_ticks(path, plot, headroom)
    click.echo(summary.to_json() if as_json else summary.text())
    if plot:
        click.echo(f"wrote {plot}", err=as_json)  # the JSON alone on stdout


if __name__ == "__main__":
    main()
