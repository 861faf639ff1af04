"""The library calls the CLI makes, one per command, usable from Python as they are."""

from pathlib import Path

import numpy as np

from ticknorm.atomic import write_text
from ticknorm.errors import InputSpecError
from ticknorm.exporter.export import DEFAULT_EXPORTER, ExportResult, export_model
from ticknorm.exporter.fusion import FusionResult, fuse_norms
from ticknorm.exporter.inspect import ModelSummary, summarize
from ticknorm.exporter.load import build_model, load_hf_directory
from ticknorm.inputs import feeds_from_specs, load_npz, parse_input_spec
from ticknorm.onnx_io import PROTOBUF_LIMIT, load_onnx, save_onnx


def load_model(model: str, checkpoint=None, trust_pickle: bool = False):
    """`model` is a factory (`pkg.mod:fn`, `file.py:fn`) or a Hugging Face `save_pretrained` folder."""
    if Path(model).is_dir():
        if checkpoint is not None:
            raise InputSpecError(f"{model} is a Hugging Face directory with its own weights; drop --checkpoint")
        return load_hf_directory(model)
    return build_model(model, checkpoint, trust_pickle)


def example_feeds(specs: list[str], npz=None, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Feeds from `--input` specs or an `.npz`, and the dynamic axes the specs name."""
    if npz is not None and specs:
        raise InputSpecError("give inputs either as --input specs or as an .npz file, not both")
    if npz is not None:
        return load_npz(npz), {}
    if not specs:
        raise InputSpecError("no inputs: give --input NAME:DIMS:DTYPE (e.g. input_ids:batch=2xseq=16:int64) or --input-file")
    parsed = [parse_input_spec(spec) for spec in specs]
    return feeds_from_specs(parsed, seed), {s.name: s.dynamic_axes for s in parsed if s.dynamic_axes}


def export(model: str, output, inputs: list[str] = (), input_file=None, checkpoint=None, trust_pickle=False,
           exporter: str = DEFAULT_EXPORTER, opset=None, fuse: bool = True, check: bool = True, report=None,
           external_data_threshold: int = PROTOBUF_LIMIT, seed: int = 0, progress=lambda m: None) -> ExportResult:
    feeds, dynamic_axes = example_feeds(list(inputs), input_file, seed)
    progress("loading the model")
    module = load_model(model, checkpoint, trust_pickle)
    result = export_model(module, feeds, output, exporter=exporter, opset=opset, dynamic_axes=dynamic_axes,
                          fuse=fuse, check=check, external_data_threshold=external_data_threshold, progress=progress)
    if report is not None and result.fusion is not None:
        write_text(report, result.fusion.to_json())
    return result


def fuse(source, output, opset=None, inputs: list[str] = (), input_file=None, verify: bool = True, report=None,
         seed: int = 0) -> FusionResult:
    model = load_onnx(source)
    feeds = example_feeds(list(inputs), input_file, seed)[0] if (inputs or input_file) else None
    result = fuse_norms(model, opset=opset, verify=verify, feeds=feeds)
    save_onnx(result.model, output)
    if report is not None:
        write_text(report, result.report.to_json())
    return result


def inspect(source) -> ModelSummary:
    return summarize(load_onnx(source))
