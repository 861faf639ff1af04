"""Accuracy of runtimes against the PyTorch graph: per output, and per module with `per_layer`.

Per module, PyTorch's output comes from a forward hook and the runtime's from the ONNX tensor the
scope map names as that module's output, tapped as an extra output. Tapping may stop a runtime
from fusing across that tensor, so the final outputs of the tapped run are checked against the
untapped run and the difference is reported."""

import fnmatch
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ticknorm.base.scopes import module_output_tensors
from ticknorm.runtime.registry import make_runner
from ticknorm.runtime.torch_runner import TorchRunner
from ticknorm.base.inputs import graph_feeds
from ticknorm.base.metrics import ArrayComparison, compare_arrays, ensure_finite


# Above this, tapping changed what the runtime computes (it could not fuse across a tap).
TAP_EFFECT_LIMIT = 1e-5


@dataclass
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-3
    per_output: dict = field(default_factory=dict)  # output name -> (atol, rtol)

    def of(self, name: str) -> tuple[float, float]:
        return self.per_output.get(name, (self.atol, self.rtol))


@dataclass
class LayerRow:
    module: str
    tensor: str
    runtime: str
    comparison: ArrayComparison | None
    note: str = ""


@dataclass
class CompareReport:
    outputs: dict = field(default_factory=dict)  # runtime -> [ArrayComparison]
    layers: list = field(default_factory=list)  # LayerRow, in the order PyTorch finished the modules
    first_failure: dict = field(default_factory=dict)  # runtime -> module or None
    tap_effect: dict = field(default_factory=dict)  # runtime -> max |tapped - untapped| of final outputs

    @property
    def passed(self) -> bool:
        return all(c.passed for checks in self.outputs.values() for c in checks)

    def __bool__(self) -> bool:
        return self.passed

    def text(self) -> str:
        lines = []
        for runtime, checks in self.outputs.items():
            lines.append(f"{runtime} vs torch:")
            lines += ["  " + check.line() for check in checks]
        if self.layers:
            lines.append(f"per module ({len({r.module for r in self.layers})} tapped):")
            lines.append(f"  {'module':<40} {'runtime':<10} {'max abs':>10} {'cosine':>10}  verdict")
            for row in self.layers:
                c = row.comparison
                verdict = row.note if c is None else ("ok" if c.passed else "FAIL")
                numbers = f"{c.max_abs:>10.3g} {c.cosine:>10.6f}" if c else f"{'-':>10} {'-':>10}"
                lines.append(f"  {row.module or '(root)':<40} {row.runtime:<10} {numbers}  {verdict}")
            for runtime, module in self.first_failure.items():
                lines.append(f"{runtime}: first module over tolerance: {module}" if module else
                             f"{runtime}: every tapped module within tolerance")
            for runtime, effect in self.tap_effect.items():
                flag = "  WARNING: tapped numbers may not be what an untapped run computes" if effect > TAP_EFFECT_LIMIT else ""
                lines.append(f"{runtime}: tapping moved the final outputs by at most {effect:.3g}{flag}")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=float)


def select_modules(scope_map: dict, depth: int | None, pattern: str | None) -> list[str]:
    """Modules to tap: all that the scope map knows, cut by depth (segments of the path) and a
    glob on the path, so a large model's taps fit in memory."""
    chosen = []
    for module in scope_map:
        if depth is not None and len(module.split(".")) > depth:
            continue
        if pattern and not fnmatch.fnmatchcase(module, pattern):
            continue
        chosen.append(module)
    return chosen


def compare(model: onnx.ModelProto, module, feeds: dict, runtimes=("ort",), tolerance: Tolerance | None = None,
            per_layer: bool = False, depth: int | None = None, pattern: str | None = None,
            profile: dict | None = None, trt_settings=None, fp32_modules=(), ort_optimization: str = "all",
            progress=lambda message: None) -> CompareReport:
    tolerance = tolerance or Tolerance()
    output_names = [o.name for o in model.graph.output]
    scope_map = module_output_tensors(model) if per_layer else {}
    known = {name for name, _ in module.named_modules()}
    modules = [m for m in select_modules(scope_map, depth, pattern) if m in known] if per_layer else []
    runners = {runtime: make_runner(runtime, model, profile, ort_optimization, trt_settings, module, fp32_modules)
               for runtime in runtimes}
    for runner in runners.values():
        runner.activate()  # an unavailable runtime fails here, before any work, with its reason
    progress("running the PyTorch reference")
    reference = TorchRunner(module, output_names).infer(feeds, taps=modules)
    ensure_finite(reference.outputs, "the PyTorch reference")
    runtime_feeds = graph_feeds(model, feeds)
    report = CompareReport()
    for runtime, runner in runners.items():
        progress(f"running {runtime}")
        feeds_here = feeds if runner.taps_modules else runtime_feeds
        plain = runner.infer(feeds_here)
        report.outputs[runtime] = [compare_arrays(name, reference.outputs[name], plain.outputs[name], *tolerance.of(name))
                                   for name in output_names]
        if per_layer:
            progress(f"running {runtime} with {len(modules)} taps")
            _compare_layers(report, runtime, runner, feeds_here, reference, modules, scope_map, plain, tolerance)
    return report


def _compare_layers(report, runtime, runner, feeds, reference, modules, scope_map, plain, tolerance) -> None:
    if runner.taps_modules:
        scope_map = {m: m for m in modules}
    tensors = [scope_map[m] for m in modules if m in reference.taps]
    tapped = runner.infer(feeds, taps=list(dict.fromkeys(tensors)))
    report.tap_effect[runtime] = max(
        (float(np.max(np.abs(tapped.outputs[n].astype(np.float64) - plain.outputs[n].astype(np.float64))))
         for n in plain.outputs if plain.outputs[n].size and plain.outputs[n].dtype.kind in "fc"), default=0.0)
    first = None
    for module, expected in reference.taps.items():
        tensor = scope_map.get(module)
        actual = tapped.taps.get(tensor)
        if actual is None:
            report.layers.append(LayerRow(module, tensor or "", runtime, None, "no ONNX tensor"))
            continue
        if actual.shape != expected.shape:
            report.layers.append(LayerRow(module, tensor, runtime, None,
                                          f"shape {list(actual.shape)} vs torch {list(expected.shape)}: not compared"))
            continue
        comparison = compare_arrays(module, expected, actual, tolerance.atol, tolerance.rtol)
        report.layers.append(LayerRow(module, tensor, runtime, comparison))
        if first is None and not comparison.passed:
            first = module
    report.first_failure[runtime] = first
