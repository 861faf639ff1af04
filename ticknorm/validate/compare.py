"""Accuracy of runtimes against the PyTorch graph: per output, and per module with a `LayerSelection`.

Per module, PyTorch's output comes from a forward hook and the runtime's from the ONNX tensor the
scope map names as that module's output, tapped as an extra output. Tapping may stop a runtime
from fusing across that tensor, so the final outputs of the tapped run are checked against the
untapped run and the difference is reported."""

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ticknorm.base.errors import InputSpecError
from ticknorm.base.run_results import SavedReference, saved_outputs
from ticknorm.base.inputs import as_feed_sets, graph_feeds
from ticknorm.base.metrics import ArrayComparison, ResolvedTolerance, Tolerance, compare_arrays, ensure_finite
from ticknorm.base.scopes import LayerSelection, fit_scopes, module_coverage, module_output_tensors
from ticknorm.base.text_table import render
from ticknorm.base.precision import TYPE_NAMES, Fp32Island
from ticknorm.runtime.file_reference import FileReference
from ticknorm.runtime.registry import RunnerSetup, judged_precision, make_runner
from ticknorm.runtime.torch_runner import TorchRunner, module_precision


# Above this, tapping changed what the runtime computes (it could not fuse across a tap).
TAP_EFFECT_LIMIT = 1e-5

# What the final outputs are judged against, besides PyTorch: saved outputs, or the file alone.
Reference = SavedReference | FileReference
FILE_RUNNER = "reference"  # a file reference's runner name in a bundle's outputs.json


@dataclass
class LayerRow:
    module: str
    tensor: str
    runtime: str
    comparison: ArrayComparison | None
    note: str = ""


@dataclass
class CompareReport:
    outputs: dict[str, list[ArrayComparison]] = field(default_factory=dict)  # by runtime
    layers: list[LayerRow] = field(default_factory=list)  # in the order PyTorch finished the modules
    first_failure: dict[str, str | None] = field(default_factory=dict)  # by runtime: its first module over tolerance
    tap_effect: dict[str, float] = field(default_factory=dict)  # by runtime: max |tapped - untapped| of final outputs
    fp32_islands: dict[str, list[Fp32Island]] = field(default_factory=dict)  # by low type: its targets kept in fp32
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)  # by runtime: (atol, rtol) judged at
    reference: str = "torch"  # what the final outputs were judged against
    layers_note: str = ""  # why per-module rows were asked for and there are none
    unit: str = "module"  # what a per-layer row is: a module, or a node of a file that names none

    @property
    def passed(self) -> bool:
        return all(c.passed for checks in self.outputs.values() for c in checks)

    def __bool__(self) -> bool:
        return self.passed

    def text(self) -> str:
        lines = [f"kept in fp32 for {dtype}: {island.module or '(root)'} [{island.node}]: {island.reason}"
                 for dtype, islands in self.fp32_islands.items() for island in islands]
        for runtime, checks in self.outputs.items():
            atol, rtol = self.tolerances.get(runtime, (None, None))
            judged_at = f" (atol {atol:g}, rtol {rtol:g})" if atol is not None else ""
            lines.append(f"{runtime} vs {self.reference}{judged_at}:")
            lines += ["  " + check.line() for check in checks]
        if self.layers:
            lines.append(f"per {self.unit} ({len({r.module for r in self.layers})} tapped):")
            cells = [_cells(row) for row in self.layers]
            table = render([self.unit, "runtime", "max abs", "cosine", "verdict"], cells, 2)
            lines += ["  " + line for line in table.splitlines()]
            for runtime, module in self.first_failure.items():
                lines.append(f"{runtime}: first {self.unit} over tolerance: {module}" if module else
                             f"{runtime}: every tapped {self.unit} within tolerance")
            for runtime, effect in self.tap_effect.items():
                warning = "  WARNING: tapped numbers may not be what an untapped run computes"
                flag = warning if effect > TAP_EFFECT_LIMIT else ""
                lines.append(f"{runtime}: tapping moved the final outputs by at most {effect:.3g}{flag}")
        elif self.layers_note:
            lines.append(self.layers_note)
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=float)


def _cells(row: LayerRow) -> list[str]:
    """A per-module row of the text: its numbers and verdict, or why it has none."""
    found = row.comparison
    if found is None:
        return [row.module or "(root)", row.runtime, "-", "-", row.note]
    verdict = "ok" if found.passed else "FAIL"
    return [row.module or "(root)", row.runtime, f"{found.max_abs:.3g}", f"{found.cosine:.6f}", verdict]


def compare_runtimes(model: onnx.ModelProto, feeds, runtimes, setup: RunnerSetup,
                     tolerance: Tolerance | None = None, layers: LayerSelection | None = None,
                     progress=lambda message: None, reference: Reference | None = None) -> CompareReport:
    """PyTorch (`setup.module`, fp32 CPU) vs each runtime on `feeds` (one feed dict, or one per
    iteration, each output compared per iteration), and, with `layers`, per module on the first.
    `reference` judges the final outputs instead: saved outputs (PyTorch then runs only for the
    per-module taps, when asked), or, with no PyTorch model, the file itself (`FileReference`),
    whose per-module (or per-node) tensors are tapped too. Every runtime is checked for
    availability before any work; then one runner at a time holds the model, for every
    iteration: the plain one, then (with `layers`) the tapped one."""
    tolerance = tolerance or Tolerance()
    feed_sets = as_feed_sets(feeds)
    modules, layers_note = _tapped_modules(model, setup, layers, reference) if layers else ([], "")
    runners = {runtime: make_runner(runtime, model, setup) for runtime in runtimes}
    for runner in runners.values():
        runner.check_available()  # an unavailable runtime fails here, before any work, with its reason
    expected = reference_run(model, feed_sets, setup, reference, modules, progress)
    unit = "node" if isinstance(reference, FileReference) and reference.by_node else "module"
    modules, layers_note = _twinned(modules, expected, unit, progress) if modules else (modules, layers_note)
    report = CompareReport(reference=expected.label, layers_note=layers_note, unit=unit)
    for runtime, runner in runners.items():
        progress(f"running {runtime}")
        runtime_sets = feed_sets if isinstance(runner, TorchRunner) else [graph_feeds(model, f) for f in feed_sets]
        with runner:
            plain = [runner.infer(feed_set).outputs for feed_set in runtime_sets]
        judged = tolerance.at(TYPE_NAMES[judged_precision(runtime, model, expected.precision)])
        report.tolerances[runtime] = (judged.atol, judged.rtol)
        report.outputs[runtime] = [compare_arrays(iteration_name(name, number, len(feed_sets)), reference[name],
                                                  outputs[name], *judged.of(name))
                                   for number, (reference, outputs) in enumerate(zip(expected.outputs, plain), start=1)
                                   for name in expected.names]
        if modules:
            progress(f"running {runtime} with {len(modules)} taps")
            with make_runner(runtime, model, setup, taps=[m for m in modules if m in expected.taps]) as tapped_runner:
                tapped = tapped_runner.infer(runtime_sets[0])
            report.tap_effect[runtime] = largest_difference(plain[0], tapped.outputs)
            _compare_layers(report, runtime, module_output_tensors(model), (expected.taps, tapped.taps,
                                                                            expected.others), judged)
    return report


@dataclass
class ReferenceRun:
    """What every runtime is judged against: each iteration's outputs, the first one's tapped
    tensors by module (and PyTorch's further tensors of modules that returned several), what made
    them, and the type they were computed in (a runtime is judged at the coarser of it and its own)."""

    names: list[str]
    outputs: list[dict[str, np.ndarray]]
    taps: dict[str, np.ndarray]
    others: dict[str, list[np.ndarray]]
    label: str
    precision: str = "fp32"
    runner: str = "torch"  # the runner name its outputs are saved under (a bundle's RunResults)


def reference_run(model: onnx.ModelProto, feed_sets: list[dict], setup: RunnerSetup, reference: Reference | None,
                  modules: list[str], progress) -> ReferenceRun:
    """The reference's outputs, and its tensors of `modules` on the first iteration: PyTorch's
    (`setup.module`), the saved ones (PyTorch tapped for the modules), or the file's as the
    reference runs it."""
    names = [o.name for o in model.graph.output]
    if isinstance(reference, FileReference):
        return _file_reference_run(names, feed_sets, reference, modules, progress)
    saved = reference
    outputs = saved_outputs(saved, names, len(feed_sets)) if saved else []
    taps, others = {}, {}
    if saved is None or modules:
        progress("running the PyTorch reference")
        with TorchRunner(setup.module, names, taps=modules) as torch_runner:
            torch_runs = [torch_runner.infer(feed_set) for feed_set in feed_sets[:1 if saved else None]]
        taps, others = torch_runs[0].taps, torch_runs[0].tap_others
        outputs = outputs or [run.outputs for run in torch_runs]
    for found in outputs:
        ensure_finite(found, "the PyTorch reference" if saved is None else saved.label)
    own = module_precision(setup.module) if saved is None else "fp32"
    if saved is None:
        return ReferenceRun(names, outputs, taps, others, reference_label(own), own)
    return ReferenceRun(names, outputs, taps, others, saved.label, own, saved.runner)


def _file_reference_run(names: list[str], feed_sets: list[dict], reference: FileReference, modules: list[str],
                        progress) -> ReferenceRun:
    """The file's reference on every iteration, `modules` tapped on the first (a runtime's taps
    of an unoptimized graph change nothing it computes)."""
    progress(f"running the reference: {reference.label}")
    with reference.runner() as runner:
        runner.check_available()
        outputs = [runner.infer(reference.feeds(feed_set)).outputs for feed_set in feed_sets]
    taps = {}
    if modules:
        with reference.runner(taps=modules) as runner:
            taps = runner.infer(reference.feeds(feed_sets[0])).taps
    for found in outputs:
        missing = [name for name in names if name not in found]
        if missing:
            raise InputSpecError(f"the reference ({reference.label}) has no output {', '.join(missing)}")
        ensure_finite(found, f"the reference ({reference.label})")
    return ReferenceRun(names, outputs, taps, {}, reference.label, reference.precision, FILE_RUNNER)


# Said instead of an empty per-module section, so a graph that names no module does not pass silently.
NO_MODULE_NOTE = ("--per-layer: no node of the graph maps to a module (scope coverage {:.0%}): per-module rows need "
                  "module scopes, TorchScript-style node names, dynamo name scopes, or tf2onnx or Paddle2ONNX names "
                  "that name the model's modules")


def _twinned(modules: list[str], expected: ReferenceRun, unit: str, progress) -> tuple[list[str], str]:
    """The rows the reference has a twin of (rows are matched by name: another file's nodes may be
    named otherwise, an unnamed one by its position), and the line that says so where none has."""
    twinned = [m for m in modules if m in expected.taps]
    if not twinned:
        return [], (f"--per-layer: none of the file's {len(modules)} {unit}s has a twin in the reference "
                    f"({expected.label}); rows are matched by name: judge the file against itself, or against a "
                    "reference that names its modules or nodes alike")
    if len(twinned) < len(modules):
        left = [m for m in modules if m not in expected.taps]
        progress(f"--per-layer: {len(left)} of {len(modules)} {unit}s have no twin in the reference, left out: "
                 + ", ".join(left[:5]) + (", ..." if len(left) > 5 else ""))
    return twinned, ""


def _tapped_modules(model: onnx.ModelProto, setup: RunnerSetup, layers: LayerSelection,
                    reference: Reference | None) -> tuple[list[str], str]:
    """The modules to tap, the graph's scopes first moved onto the model's module paths (a file
    exported through a wrapper), and the line that says why there are none when no node maps.
    Judged alone (a `FileReference`), the file's own scopes are the modules (or its nodes)."""
    if isinstance(reference, FileReference):
        return finishing_order(model, layers.modules(model, module_output_tensors(model))), ""
    if setup.module is None:
        raise InputSpecError("per-module comparison taps the PyTorch model: give --model (or leave out "
                             "--reference-outputs to judge the file against itself)")
    paths = [name for name, _ in setup.module.named_modules()]
    fit_scopes(model, paths)
    modules = layers.modules(model, paths)
    coverage = module_coverage(model, paths)
    return modules, NO_MODULE_NOTE.format(coverage) if not modules and not coverage else ""


def finishing_order(model: onnx.ModelProto, modules: list[str]) -> list[str]:
    """`modules` in the order a run finishes them, as PyTorch's hooks see them: by where the graph
    makes each one's output tensor, a submodule before the module whose output is the same tensor
    (so the first over tolerance is the innermost, earliest); modules inside If branches last."""
    made = {name: index for index, node in enumerate(model.graph.node) for name in node.output}
    tensors = module_output_tensors(model)
    return sorted(modules, key=lambda module: (made.get(tensors.get(module, ""), len(made)), -module.count(".")))


def reference_label(precision: str) -> str:
    """What the outputs were judged against, saying the type a low-precision checkpoint ran in."""
    return "torch" if precision == "fp32" else f"torch in {TYPE_NAMES[precision]} (the checkpoint's type)"


def iteration_name(name: str, number: int, count: int) -> str:
    """An output's name in a comparison over `count` iterations' feeds."""
    return f"{name} (iteration {number})" if count > 1 else name


def _stand_in(module: str, tensor: str, tensors: dict[str, str], expected: dict[str, np.ndarray],
              reference: np.ndarray) -> str | None:
    """The submodule whose output the module's graph tensor is, when PyTorch says the module's own
    output is something else: the graph never computed the module's output by itself."""
    for child, child_tensor in tensors.items():
        if child_tensor == tensor and child.startswith(module + ".") and child in expected:
            same = expected[child].shape == reference.shape and np.array_equal(expected[child], reference)
            return None if same else child
    return None


def _counterpart(value: np.ndarray, candidates: list[np.ndarray]) -> np.ndarray:
    """Which of a module's PyTorch tensors the runtime's tensor is: the graph names one tensor per
    module, so where the module returned several (cos and sin), the closest of the same shape;
    the first when none has its shape."""
    same_shape = [c for c in candidates if c.shape == value.shape]
    if len(same_shape) < 2:
        return same_shape[0] if same_shape else candidates[0]
    return min(same_shape, key=lambda c: float(np.max(np.abs(c.astype(np.float64) - value.astype(np.float64)))))


def largest_difference(plain: dict[str, np.ndarray], tapped: dict[str, np.ndarray]) -> float:
    """How far tapping moved the final outputs (a runtime that cannot fuse across a tap)."""
    return max((float(np.max(np.abs(tapped[n].astype(np.float64) - plain[n].astype(np.float64))))
                for n in plain if plain[n].size and plain[n].dtype.kind in "fc"), default=0.0)


def _compare_layers(report: CompareReport, runtime: str, tensors: dict[str, str], taps: tuple,
                    tolerance: ResolvedTolerance) -> None:
    """One row per module PyTorch tapped (`taps`: PyTorch's, the runtime's, and PyTorch's further
    tensors of modules that returned several, by module), in the order PyTorch finished them;
    `tensors` is the scope map (module -> ONNX tensor)."""
    expected, actual, others = taps
    first = None
    for module, reference in expected.items():
        value, tensor = actual.get(module), tensors.get(module, "")
        if value is None:
            report.layers.append(LayerRow(module, tensor, runtime, None, "no ONNX tensor"))
            continue
        reference = _counterpart(value, [reference, *others.get(module, [])])
        stand_in = _stand_in(module, tensor, tensors, expected, reference)
        if stand_in:
            report.layers.append(LayerRow(module, tensor, runtime, None,
                                          f"no tensor of its own (the graph's is {stand_in}'s; its last op was fused "
                                          "into a later node)"))
            continue
        if value.shape != reference.shape:
            report.layers.append(LayerRow(module, tensor, runtime, None,
                                          f"shape {list(value.shape)} vs torch {list(reference.shape)}: not compared"))
            continue
        comparison = compare_arrays(module, reference, value, tolerance.atol, tolerance.rtol, tolerance.rule)
        report.layers.append(LayerRow(module, tensor, runtime, comparison))
        if first is None and not comparison.passed:
            first = module
    report.first_failure[runtime] = first
