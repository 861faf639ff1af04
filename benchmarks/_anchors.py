"""Third-party fp16/bf16 converters ("anchors") run side by side with ticknorm in benchmarks/precision.py.

A precision figure for ticknorm means little alone: this module converts the same fp32 model with
onnxconverter-common's `float16` and NVIDIA ModelOpt's AutoCast, each with its documented defaults
plus keep_io_types=True, so the benchmark can put their errors, fp32 islands and times next to ours.
Neither package is a dependency of the project: each is imported only when called, and one that is
missing, lacks the precision asked for, or fails, gives a one-line reason instead of a model.
"""

import importlib.util
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx

NOT_COMPUTE = {"Cast", "Constant"}


def anchor_conversions(model: onnx.ModelProto, feeds: dict[str, np.ndarray], low: str) -> dict[str, dict]:
    """Convert `model` (fp32) to `low` ("fp16" or "bf16") with each anchor; never raises.

    Returns, per anchor name, {"model", "seconds", "kept_fp32", "note"} or {"error": one line}.
    `seconds` times the conversion call alone (ModelOpt's includes writing its temporary input
    files, since it reads a path); `kept_fp32` is counted by `kept_fp32_nodes` on the result.
    """
    results = {}
    for name, prepare in (("onnxconverter-common", _onnxconverter_common), ("modelopt-autocast", _modelopt_autocast)):
        try:
            convert = prepare(low)  # imports the anchor; raises ImportError or ValueError with the reason
            start = time.perf_counter()
            converted, note = convert(model, feeds)
            seconds = time.perf_counter() - start
            before, after = _opset(model), _opset(converted)
            if before != after:
                note += f"; opset {before} -> {after}"
            results[name] = {"model": converted, "seconds": seconds, "kept_fp32": kept_fp32_nodes(converted),
                             "note": note}
        except Exception as error:  # an anchor's failure is a result, not a crash of the benchmark
            message = str(error).strip().splitlines()
            results[name] = {"error": f"{type(error).__name__}: {message[0] if message else ''}"}
    return results


def kept_fp32_nodes(model: onnx.ModelProto) -> int:
    """Nodes of the main graph, Cast and Constant aside, with at least one float32 output.

    Output types come from ONNX type inference on the converted model, graph inputs, outputs and
    initializers; an output ONNX cannot type (a contrib op such as SimplifiedLayerNormalization)
    takes its node's first input type. Casts are the converters' own glue and Constants are not
    computation, so what is counted is the computation left in fp32.
    """
    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {value.name: value.type.tensor_type.elem_type for value in (*graph.input, *graph.output, *graph.value_info)}
    types.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    kept = 0
    for node in graph.node:
        for output in node.output:
            types[output] = types.get(output) or (types.get(node.input[0]) if node.input else None)
        kept += node.op_type not in NOT_COMPUTE and onnx.TensorProto.FLOAT in (types[output] for output in node.output)
    return kept


def _opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def _onnxconverter_common(low: str):
    if low != "fp16":
        raise ValueError(f"no {low} path: onnxconverter_common.float16 converts to float16 only")
    from onnxconverter_common.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    def convert(model, _feeds):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # it edits the graph it is given
        with warnings.catch_warnings(record=True) as clamps:  # one warning per tensor and side clamped
            warnings.simplefilter("always")
            converted = convert_float_to_float16(copy, keep_io_types=True)
        clamped = sum(str(clamp.message).startswith("the float32 number") for clamp in clamps)
        blocked = len(DEFAULT_OP_BLOCK_LIST)
        return converted, f"op_block_list=DEFAULT_OP_BLOCK_LIST ({blocked} op types); {clamped} clamps to |x| in [1e-7, 1e4]"

    return convert


def _modelopt_autocast(low: str):
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.autocast.convert import DEFAULT_DATA_MAX
    from modelopt.onnx.autocast.logging_config import configure_logging

    configure_logging(logging.WARNING)  # AutoCast logs every decision to stdout at INFO

    def convert(model, feeds):
        standard = {schema.name for schema in onnx.defs.get_all_schemas()}
        plugins = sorted({node.op_type for node in model.graph.node} - standard)
        if plugins and importlib.util.find_spec("tensorrt") is None:  # else a NameError deep inside AutoCast
            raise ValueError(f"AutoCast takes {', '.join(plugins)} for TensorRT plugins and needs tensorrt")
        with tempfile.TemporaryDirectory() as folder:
            path, calibration = Path(folder, "model.onnx"), Path(folder, "feeds.npz")
            onnx.save(model, path)
            np.savez(calibration, **feeds)
            converted = convert_to_mixed_precision(
                str(path), low_precision_type=low, keep_io_types=True, calibration_data=str(calibration)
            )
        return converted, f"data_max={DEFAULT_DATA_MAX} on the feeds' fp32 run, init_max=fp16 max, default rules"

    return convert
