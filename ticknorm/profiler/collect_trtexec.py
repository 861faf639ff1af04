"""TensorRT timings made on the target GPU by trtexec, read from its files:

    trtexec --onnx=M.onnx --profilingVerbosity=detailed --separateProfileRun \
            --exportProfile=profile.json --exportLayerInfo=layers.json

`--exportProfile` is a JSON list: `{"count": N}` (the profiled iterations), then one entry per
layer with `name`, `timeMs` (all iterations), `averageMs`, `medianMs`, `percentage`. With
`--exportLayerInfo` (detailed verbosity) each layer's `Metadata` names the ONNX nodes it runs
(`[ONNX Layer: /layers.0/ln/LayerNormalization]`, joined by \\x1e), the surest way back to a module;
without it a layer's own name is read as TensorRT writes it (`A + B`, `{ForeignNode[a...b]}`).
Layers that map to no module are the `(unattributed)` row, counted, never dropped. The files carry
aggregates, not iterations: each layer becomes one span of its median time.

trtexec's console output (`| tee trtexec.log`) says what the JSON files do not: the TensorRT
version (`TensorRT version: 10.16.0`, or `[TensorRT v101600]` on its first line), the GPU
(`Selected Device:`), the precision flags it built with, and the `GPU Compute Time` of its plain
runs (the end to end; the layers' sum is then the profiled run, and their ratio the profiling
overhead). The layer info's `Format/Datatype` per layer output says which types the engine runs."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ticknorm.base.errors import InputSpecError
from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.ticks import Span, Tick, TickLog
from ticknorm.runtime.registry import TrtexecFiles

_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
RUNTIME = "trt (trtexec)"
# Layer output types as TensorRT writes them ("Half", "Row major linear FP16 format"), bf16 first:
# "BFloat16" also holds "Float".
_TYPES = (("bf16", ("BF16", "BFLOAT16")), ("fp8", ("FP8",)), ("fp16", ("FP16", "HALF")), ("fp32", ("FP32", "FLOAT")),
          ("int8", ("INT8",)))


@dataclass(frozen=True)
class TrtexecLog:
    """What trtexec's console output states about the engine it timed."""

    version: str | None = None
    gpu: str | None = None
    precision: str | None = None  # the build's precision line, or "strongly typed"
    gpu_compute_ms: float | None = None  # median GPU compute time of the plain (unprofiled) runs


def import_trtexec(files: TrtexecFiles, table: ScopeTable) -> TickLog:
    entries = _read(files.profile, "trtexec --exportProfile")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InputSpecError(f"{files.profile} is not a trtexec --exportProfile file (a JSON list of layer timings)")
    count = entries[0].get("count", 0)
    layers = [e for e in entries if "name" in e]
    if not layers or any("averageMs" not in e and "medianMs" not in e for e in layers):
        raise InputSpecError(f"{files.profile} has no layer timings (entries with name and averageMs/medianMs)")
    info = _layer_info(files.layers) if files.layers is not None else {}
    log = TickLog(RUNTIME, "runtime", iterations=1)
    cursor = 0
    for entry in layers:
        duration = int(float(entry.get("medianMs", entry.get("averageMs"))) * 1e6)
        modules = _modules(entry["name"], info.get(entry["name"], {}), table)
        log.spans.append(Span(entry["name"], modules, 0, Tick("runtime", cursor), Tick("runtime", cursor + duration)))
        cursor += duration
    stated = read_trtexec_log(files.log) if files.log is not None else TrtexecLog()
    log.instrumented_ns = [cursor]  # the profiled run: the layers' sum, copies excluded
    log.end_to_end_ns = [int(stated.gpu_compute_ms * 1e6)] if stated.gpu_compute_ms else [cursor]
    unmapped = sum(not span.modules for span in log.spans)
    log.source = "; ".join(part for part in (
        "imported from trtexec files",
        f"TensorRT {stated.version or '?'} on {stated.gpu or '? (give --trtexec-log for the version and GPU)'}",
        f"built {stated.precision}" if stated.precision else "",
        f"layer outputs in {_types(info)}" if info else "",
        f"per-layer medians of {count} profiled iterations" if count else "per-layer averages",
        "end-to-end: trtexec's median GPU compute time of its plain runs" if stated.gpu_compute_ms else
        "end-to-end: the layers' sum (give --trtexec-log for the plain runs' time)",
        f"{unmapped} of {len(layers)} layers map to no module" if unmapped else f"all {len(layers)} layers mapped"))
    return log


def _modules(name: str, layer: dict, table: ScopeTable) -> tuple:
    nodes = [node for node in _ONNX_LAYER.findall(str(layer.get("Metadata", ""))) if node in table.scope]
    if nodes:
        return tuple(sorted({table.scope[node] for node in nodes}))
    return table.modules_for_trt(name)


def _layer_info(path) -> dict[str, dict]:
    """TensorRT layer name -> its detailed layer info (`Metadata` names the ONNX nodes it runs);
    the default verbosity lists names only, which give nothing beyond the profile's."""
    info = _read(path, "trtexec --exportLayerInfo")
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list):
        raise InputSpecError(f"{path} is not a trtexec --exportLayerInfo file (a JSON object with a 'Layers' list)")
    return {layer["Name"]: layer for layer in layers if isinstance(layer, dict) and "Name" in layer}


def _types(info: dict) -> str:
    """How many layers write each type, most first: "fp16 (40 layers), fp32 (3 layers)"."""
    counts: dict[str, int] = {}
    for layer in info.values():
        found = {_type_of(str(o.get("Format/Datatype", ""))) for o in layer.get("Outputs", []) if isinstance(o, dict)}
        for name in found:
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
    if not counts:
        return "types not stated (profilingVerbosity=detailed states them)"
    return ", ".join(f"{name} ({n} layers)" for name, n in sorted(counts.items(), key=lambda item: -item[1]))


def _type_of(text: str) -> str | None:
    upper = text.upper()
    return next((name for name, words in _TYPES if any(word in upper for word in words)), None)


def read_trtexec_log(path) -> TrtexecLog:
    path = Path(path)
    if not path.is_file():
        raise InputSpecError(f"trtexec log file not found: {path}")
    text = path.read_text(errors="replace")
    version = _search(r"TensorRT version: (\S+)", text)
    packed = _search(r"\[TensorRT v(\d+)\]", text)
    if version is None and packed is not None:
        number = int(packed)
        version = f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    if version is None:
        raise InputSpecError(f"{path} is not trtexec's console output (no 'TensorRT version' or "
                             "'&&&& RUNNING TensorRT.trtexec' line)")
    strongly = "--stronglyTyped" in text.split("\n", 1)[0] or "Strongly Typed" in text
    precision = "strongly typed (types from the graph)" if strongly else _search(r"\] Precision: (.+)", text)
    median = _search(r"GPU Compute Time: .*?median = ([0-9.eE+-]+) ms", text)
    return TrtexecLog(version, _search(r"Selected Device: (.+)", text), precision, float(median) if median else None)


def _search(pattern: str, text: str) -> str | None:
    found = re.search(pattern, text)
    return found.group(1).strip() if found else None


def _read(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise InputSpecError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputSpecError(f"{path} is not a readable {what} file ({exc})") from exc
