"""TensorRT timings made on the target GPU by trtexec, read from its files:

    trtexec --onnx=M.onnx --profilingVerbosity=detailed --separateProfileRun \
            --exportProfile=profile.json --exportLayerInfo=layers.json

`--exportProfile` is a JSON list: `{"count": N}` (the profiled iterations), then one entry per
layer with `name`, `timeMs` (all iterations), `averageMs`, `medianMs`, `percentage`. With
`--exportLayerInfo` (detailed verbosity) each layer's `Metadata` names the ONNX nodes it runs
(`[ONNX Layer: /layers.0/ln/LayerNormalization]`, joined by \\x1e), the surest way back to a module;
without it a layer's own name is read as TensorRT writes it (`A + B`, `{ForeignNode[a...b]}`).
Layers that map to no module are the `(unattributed)` row, counted, never dropped. The files carry
aggregates, not iterations: each layer becomes one span of its median time."""

import json
import re
from pathlib import Path

from ticknorm.base.errors import InputSpecError
from ticknorm.profiler.align import ScopeTable
from ticknorm.profiler.ticks import Span, Tick, TickLog

_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
RUNTIME = "trt (trtexec{})"


def import_trtexec(profile_path, layers_path, table: ScopeTable) -> TickLog:
    entries = _read(profile_path, "trtexec --exportProfile")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InputSpecError(f"{profile_path} is not a trtexec --exportProfile file (a JSON list of layer timings)")
    count = entries[0].get("count", 0)
    layers = [e for e in entries if "name" in e]
    if not layers or any("averageMs" not in e and "medianMs" not in e for e in layers):
        raise InputSpecError(f"{profile_path} has no layer timings (entries with name and averageMs/medianMs)")
    onnx_nodes = _onnx_nodes(layers_path) if layers_path is not None else {}
    log = TickLog(RUNTIME.format(f", median of {count}" if count else ""), "runtime", iterations=1)
    cursor = 0
    for entry in layers:
        duration = int(float(entry.get("medianMs", entry.get("averageMs"))) * 1e6)
        log.spans.append(Span(entry["name"], _modules(entry["name"], onnx_nodes, table), 0, Tick("runtime", cursor),
                              Tick("runtime", cursor + duration)))
        cursor += duration
    log.end_to_end_ns = log.instrumented_ns = [cursor]  # the layers' sum: trtexec's GPU compute, copies excluded
    return log


def _modules(name: str, onnx_nodes: dict, table: ScopeTable) -> tuple:
    nodes = [node for node in onnx_nodes.get(name, ()) if node in table.scope]
    if nodes:
        return tuple(sorted({table.scope[node] for node in nodes}))
    return table.modules_for_trt(name)


def _onnx_nodes(path) -> dict[str, list[str]]:
    """TensorRT layer name -> the ONNX nodes its metadata names (detailed layer info only)."""
    info = _read(path, "trtexec --exportLayerInfo")
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list):
        raise InputSpecError(f"{path} is not a trtexec --exportLayerInfo file (a JSON object with a 'Layers' list)")
    found = {}
    for layer in layers:
        if isinstance(layer, dict) and "Name" in layer:  # detailed verbosity; the default gives names only
            found[layer["Name"]] = _ONNX_LAYER.findall(str(layer.get("Metadata", "")))
    return found


def _read(path, what: str):
    path = Path(path)
    if not path.is_file():
        raise InputSpecError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputSpecError(f"{path} is not a readable {what} file ({exc})") from exc
