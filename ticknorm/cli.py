"""`ticknorm` command line: parse, call one function of `ticknorm.api`, print, exit.

Exit codes: 0 pass, 1 an accuracy failure, 2 a usage or environment error. Errors are one line
on stderr; set TICKNORM_DEBUG=1 to see the traceback of an unexpected one.
"""

import functools
import os
import sys

import click

from ticknorm import api
from ticknorm.errors import TicknormError, first_line
from ticknorm.exporter.export import DEFAULT_EXPORTER, EXPORTERS


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
    command = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                           help="Weights: .pt/.pth/.bin state dict (wrappers and DDP prefixes handled) or .safetensors.")(command)
    return click.option("--model", "model", required=True, metavar="FACTORY|HF_DIR",
                        help="pkg.module:fn or path/file.py:fn returning an nn.Module, or a save_pretrained directory.")(command)


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
@_one_line_errors
def export(model, checkpoint, trust_pickle, inputs, input_file, seed, output, exporter, opset, no_fuse, no_check,
           report, external_data_threshold):
    """Export a model to ONNX, fuse every LayerNorm, verify, and compare with PyTorch."""
    result = api.export(model, output, inputs, input_file, checkpoint, trust_pickle, exporter, opset,
                        fuse=not no_fuse, check=not no_check, report=report,
                        external_data_threshold=external_data_threshold, seed=seed, progress=_progress)
    click.echo(f"wrote {', '.join(str(f) for f in result.files)} ({result.exporter} exporter, opset {result.opset})")
    if result.fusion is not None:
        click.echo(result.fusion.summary())
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
@_one_line_errors
def fuse(source, output, opset, report, no_verify, inputs, input_file, seed):
    """Rewrite decomposed LayerNorms (and RMSNorms) in an ONNX file into single nodes."""
    result = api.fuse(source, output, opset, inputs, input_file, verify=not no_verify, report=report, seed=seed)
    click.echo(f"wrote {output}")
    click.echo(result.report.summary())


@main.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_one_line_errors
def inspect(source, as_json):
    """Opset, inputs, outputs, op histogram, LayerNorms fused and not, scope coverage."""
    summary = api.inspect(source)
    click.echo(summary.to_json() if as_json else summary.text())


if __name__ == "__main__":
    main()
