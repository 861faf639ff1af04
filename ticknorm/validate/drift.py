"""Golden bundles and numeric-drift checks.

A bundle is a folder: `inputs.json` (Polygraphy's input format, a list of feed dicts, so
`polygraphy run --load-inputs` reads it), `outputs.json` (Polygraphy RunResults holding the PyTorch
reference, or with no PyTorch model the file's own, readable by `polygraphy run --load-outputs`),
`bundle.json` (model hash, versions, the reference it holds, tolerances, per-module output
statistics and, when a ticks file was given, under `calibration` the ranges each norm reached in
training) and `history.jsonl` (one line per check).
"""

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import onnx

from ticknorm.base.atomic import PARKED_SUFFIX, check_writable_folder, locked_folder, staging_folder, swap_folder
from ticknorm.base.manifest import MANIFEST, read_manifest, unit_problems, write_manifest
from ticknorm.base.errors import BundleError, InputSpecError, OutputPathError, first_line
from ticknorm.base.scopes import module_output_tensors
from ticknorm.base.onnx_io import model_digest
from ticknorm.base.inputs import as_feed_sets, graph_feeds, load_feed_sets
from ticknorm.base.json_lines import append_lines, read_lines
from ticknorm.base.run_results import SavedReference, load_run_results, polygraphy_quiet, runner_outputs
from ticknorm.base.metrics import CHECK_RULES, ArrayComparison, Tolerance, compare_arrays, passes
from ticknorm.base.scopes import LayerSelection
from ticknorm.base.text_table import render
from ticknorm.base.precision import TYPE_NAMES
from ticknorm.exporter.precision.targets import runner_setup
from ticknorm.runtime.file_reference import FileReference
from ticknorm.runtime.registry import RunnerSetup, Runtimes, judged_precision, make_runner, runs_module
from ticknorm.ticks.log import read_ticks
from ticknorm.ticks.ranges import module_ranges, present_ranges
from ticknorm.validate.compare import (TAP_EFFECT_LIMIT, Reference, finishing_order, iteration_name, largest_difference,
                                       reference_run)

FORMAT = 1
STATS = ("mean", "std", "absmax")
HISTORY = "history.jsonl"


def versions() -> dict:
    found = {}
    for module in ("torch", "onnx", "onnxruntime", "tensorrt", "ticknorm"):
        try:
            found[module] = importlib.import_module(module).__version__
        except ImportError:
            found[module] = None
    return found


def layer_stats(array: np.ndarray) -> dict:
    values = array.astype(np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "absmax": float(np.abs(values).max())}


@dataclass(frozen=True)
class GoldenSources:
    """What a bundle takes from elsewhere than a PyTorch run: the reference when it is not PyTorch
    (Polygraphy's saved outputs, or with no PyTorch model the file itself, `FileReference`), a
    ticks file recorded in training (the norms' ranges)."""

    reference: Reference | None = None
    calibration: str | None = None

    @property
    def saved(self) -> SavedReference | None:
        return self.reference if isinstance(self.reference, SavedReference) else None


def write_bundle(model: onnx.ModelProto, module, feeds, bundle, tolerance: Tolerance | None = None,
                 layers: LayerSelection = LayerSelection(), progress=lambda message: None,
                 sources: GoldenSources | None = None) -> Path:
    """Run the reference on `feeds` (one feed dict, or one per iteration) and write the bundle; the
    per-module statistics are the first iteration's. The reference is PyTorch (`module`), or what
    `sources` names: Polygraphy's saved outputs of these feeds (PyTorch, when given, then runs only
    for the per-module statistics), or the file itself (its own scopes, or nodes, are the rows).
    A ticks file in `sources` adds the per-module peaks of the training data beside those of these
    inputs. bundle.json says which reference it holds."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import to_json

    tolerance = tolerance or Tolerance()
    sources = sources or GoldenSources()
    bundle = check_writable_folder(bundle, "bundle")
    if module is None and sources.reference is None:
        raise InputSpecError("a bundle needs a reference: give the PyTorch model or saved outputs "
                             "(--reference-outputs)")
    calibration = sources.calibration
    trained = _calibration(calibration, model, module) if calibration is not None else None  # refused before the run
    scope_map = module_output_tensors(model)
    feed_sets = as_feed_sets(feeds)
    if isinstance(sources.reference, FileReference):  # the file's own modules (or nodes), as a run finishes them
        modules = finishing_order(model, layers.modules(model, scope_map))
    else:
        modules = layers.modules(model, [name for name, _ in module.named_modules()] if module is not None else [])
    expected = reference_run(model, feed_sets, RunnerSetup(module), sources.reference, modules, progress)
    results = RunResults()
    with polygraphy_quiet():  # its warning on outputs over 1 GiB is about its own memory, not the bundle
        results.add(expected.outputs, runner_name=expected.runner)
    meta = {
        "format": FORMAT, "model_hash": model_digest(model), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(), "outputs": expected.names, "reference": expected.label,
        "rows": "node" if isinstance(sources.reference, FileReference) and sources.reference.by_node else "module",
        # the type the reference computed in (a bf16 checkpoint's PyTorch: bf16), whose tolerance a check is judged at
        "reference_precision": expected.precision,
        "tolerances": {"atol": tolerance.atol, "rtol": tolerance.rtol, "per_output": tolerance.per_output,
                       "rule": tolerance.rule},
        "layers": {m: {"tensor": scope_map[m], **layer_stats(v),
                       **({"others": [layer_stats(o) for o in expected.others[m]]} if m in expected.others else {})}
                   for m, v in expected.taps.items()},
    }
    if trained is not None:
        meta["calibration"] = trained
    _write_unit(bundle, {"inputs.json": to_json(feed_sets), "outputs.json": results.to_json(),
                         "bundle.json": json.dumps(meta, indent=2)})
    return bundle


def rows_by_node(bundle) -> bool:
    """Whether the bundle's statistics are per node (made from a file alone that names no module):
    the file checked against it is then read the same way, and hashed with those rows. A bundle
    that says nothing (or cannot be read, which `load_bundle` then reports) is per module."""
    try:
        return json.loads((Path(bundle) / "bundle.json").read_text()).get("rows") == "node"
    except (OSError, ValueError, AttributeError):
        return False


def _write_unit(bundle: Path, files: dict) -> None:
    """The bundle's files, written whole into a staging folder with their manifest and swapped in
    as one unit. The previous bundle's history moves with it, under the folder's lock, so a check
    appending meanwhile is not lost."""
    with staging_folder(bundle) as staging:
        for name, text in files.items():
            (staging / name).write_text(text)
        with locked_folder(bundle) if bundle.is_dir() else contextlib.nullcontext():
            if (bundle / HISTORY).is_file():
                shutil.copyfile(bundle / HISTORY, staging / HISTORY)
            write_manifest(staging, list(files), _generation(bundle) + 1)
            swap_folder(staging, bundle)


def _generation(bundle: Path) -> int:
    """The generation of the bundle at `bundle`, 0 when there is none (or none readable)."""
    try:
        return int((read_manifest(bundle) or {}).get("generation", 0)) if bundle.is_dir() else 0
    except (ValueError, TypeError):
        return 0


def _calibration(path, model: onnx.ModelProto, module) -> dict:
    """The ticks file's per-module peaks, for the modules of `module` (else of the graph's scopes)."""
    names = [name for name, _ in module.named_modules()] if module is not None else list(module_output_tensors(model))
    ranges = present_ranges(module_ranges(read_ticks(path)), set(names).__contains__, Path(path).name,
                            names[-1] if names else "")
    return {"file": str(path), "modules": {found.module: found.stored() for found in ranges}}


@dataclass
class LayerDrift:
    module: str
    stat: str
    reference: float
    current: float


@dataclass
class DriftReport:
    runtime: str
    outputs: list[ArrayComparison] = field(default_factory=list)  # vs the golden reference
    layers: list[LayerDrift] = field(default_factory=list)  # rows that moved beyond tolerance, in model order
    layers_checked: int = 0
    unmatched: list[str] = field(default_factory=list)  # bundle modules this graph has no output tensor for
    tolerance: tuple[float, float, str] | tuple[()] = ()  # (atol, rtol, rule) the check used
    tap_effect: float = 0.0  # max |tapped - untapped| of the outputs: what tapping changed in this runtime
    unit: str = "module"  # what a row is: "node" for a bundle made from a file that names no module

    @property
    def drifted_modules(self) -> list[str]:
        """Modules with a drifted statistic, in the order PyTorch finished them."""
        return list(dict.fromkeys(row.module for row in self.layers))

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.outputs) and not self.layers

    def __bool__(self) -> bool:
        return self.passed

    def text(self) -> str:
        atol, rtol, rule = self.tolerance or (None, None, None)
        judged_at = f" (atol {atol:g}, rtol {rtol:g}, {rule} rule)" if atol is not None else ""
        lines = [f"{self.runtime} vs golden reference{judged_at}:"] + ["  " + c.line() for c in self.outputs]
        drifted = self.drifted_modules
        unit = self.unit
        first = f" ({len(self.layers)} statistics); first drifted {unit}: {drifted[0] or '(root)'}" if drifted else ""
        lines.append(f"per-{unit} statistics: {self.layers_checked} {unit}s checked, {len(drifted)} drifted{first}")
        if drifted:
            rows = []
            for module in drifted:
                moved = [row for row in self.layers if row.module == module]
                worst = max(moved, key=lambda row: abs(row.current - row.reference) / max(abs(row.reference), 1e-12))
                rows.append([module or "(root)", worst.stat, f"{worst.reference:.6g}", f"{worst.current:.6g}",
                             f"+{len(moved) - 1}" if len(moved) > 1 else ""])
            table = render(["module", "statistic", "golden", "now", "more"], rows, 2)
            lines += ["  " + line for line in table.splitlines()]
        if self.unmatched:
            lines.append(f"not checked, no output tensor for them in this graph: {', '.join(self.unmatched)}")
        warning = "; WARNING: the statistics may not be what an untapped run computes"
        flag = warning if self.tap_effect > TAP_EFFECT_LIMIT else ""
        lines.append(f"the verdict is the untapped run's; tapping moved the outputs by at most "
                     f"{self.tap_effect:.3g}{flag}")
        lines.append("PASS" if self.passed else "DRIFT")
        return "\n".join(lines)


DAMAGED = "is an incomplete or damaged bundle (written by a killed run, or changed since it was written)"


def load_bundle(bundle) -> tuple[dict, list, list]:
    """(meta, a feed dict per iteration, the reference outputs per iteration). The reference is the
    `torch` runner's, or, when the bundle was made from Polygraphy's saved outputs, its runner's.
    A bundle whose files do not match its manifest is refused before anything is read."""
    bundle = Path(bundle)
    parked = bundle.with_name(bundle.name + PARKED_SUFFIX)
    if not bundle.is_dir():
        if parked.is_dir():
            raise BundleError(f"{bundle} is missing: a drift snapshot was killed while replacing it; the previous "
                              f"bundle is intact at {parked}: rename it back, or snapshot again")
        raise BundleError(f"bundle folder not found: {bundle}")
    names = ("bundle.json", "inputs.json", "outputs.json", MANIFEST)
    if not any((bundle / name).is_file() for name in names):
        raise BundleError(f"{bundle} is not a ticknorm bundle: it holds none of {', '.join(names)}")
    for name in names[:3]:
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle} {DAMAGED}: {name} is missing")
    try:
        manifest = read_manifest(bundle)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle} {DAMAGED}: {MANIFEST} is not readable ({first_line(exc)})") from exc
    if manifest is None:
        raise BundleError(f"{bundle} {DAMAGED}: it has no {MANIFEST} (written last; bundles from before it "
                          "existed must be snapshotted again)")
    problems = unit_problems(bundle, manifest)
    if problems:
        raise BundleError(f"{bundle} {DAMAGED}: {'; '.join(problems)}")
    try:
        meta = json.loads((bundle / "bundle.json").read_text())
        feeds = load_feed_sets(bundle / "inputs.json")
        _, references = runner_outputs(load_run_results(bundle / "outputs.json"), bundle / "outputs.json")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle} {DAMAGED}: bundle.json is not JSON ({first_line(exc)})") from exc
    except InputSpecError as exc:
        raise BundleError(f"{bundle} {DAMAGED}: {exc}") from exc
    _check_meta(meta, bundle)
    if len(references) != len(feeds):
        raise BundleError(f"{bundle} {DAMAGED}: {len(feeds)} input iterations, {len(references)} references")
    return meta, feeds, references


def _check_meta(meta, bundle: Path) -> None:
    """bundle.json holds what `check_bundle` reads, of the types it reads them as: a field that
    does not is named, instead of failing somewhere in the check."""
    def fail(field: str, expected: str) -> NoReturn:
        raise BundleError(f"{bundle} {DAMAGED}: bundle.json field '{field}' is not {expected}")

    number = (int, float)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{bundle} is not a bundle of format {FORMAT}")
    if not isinstance(meta.get("model_hash"), str):
        fail("model_hash", "a string")
    if not isinstance(meta.get("outputs"), list) or not all(isinstance(n, str) for n in meta["outputs"]):
        fail("outputs", "a list of output names")
    tolerances = meta.get("tolerances")
    if not isinstance(tolerances, dict):
        fail("tolerances", "an object")
    for key in ("atol", "rtol"):
        if key not in tolerances or not (tolerances[key] is None or isinstance(tolerances[key], number)):
            fail(f"tolerances.{key}", "a number or null")
    per_output = tolerances.get("per_output", {})
    if not isinstance(per_output, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, number) for x in v) for v in per_output.values()):
        fail("tolerances.per_output", "an object of output name -> [atol, rtol]")
    if tolerances.get("rule", "ticknorm") not in CHECK_RULES:
        fail("tolerances.rule", f"one of {', '.join(CHECK_RULES)}")
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        fail("layers", "an object")
    for module, stats in layers.items():
        if not isinstance(stats, dict) or not all(isinstance(stats.get(stat), number) for stat in STATS):
            fail(f"layers.{module}", f"an object with numbers {', '.join(STATS)}")


def check_bundle(bundle, model: onnx.ModelProto, runtime: str = "ort", allow_model_change: bool = False,
                 progress=lambda message: None, record: bool = True, weights_dir=None) -> DriftReport:
    """Re-run `model` on the stored inputs and compare with the stored reference; appends to the
    bundle's history whatever the verdict (unless `record` is False). `weights_dir` holds the
    weights of a graph read alone (`graph_only`), which ONNX Runtime maps from there."""
    meta, inputs, golden = load_bundle(bundle)
    if record and not os.access(bundle, os.W_OK | os.X_OK):
        raise OutputPathError(f"bundle {bundle} is read-only: drift check appends its verdict to history.jsonl there; "
                              "pass --no-history to check without recording")
    digest = model_digest(model, weights_dir)
    if digest != meta["model_hash"] and not allow_model_change:
        raise BundleError(f"the bundle was made for model {meta['model_hash'][:12]}, this model is {digest[:12]}; "
                          "pass --allow-model-change to check a re-exported model against it")
    tolerances = meta["tolerances"]
    per_output = {k: tuple(v) for k, v in tolerances["per_output"].items()}
    stored = Tolerance(tolerances["atol"], tolerances["rtol"], per_output, tolerances.get("rule", "ticknorm"))
    tolerance = stored.at(TYPE_NAMES[judged_precision(runtime, model, meta.get("reference_precision", "fp32"))])
    layers = meta["layers"]
    if runs_module(runtime):
        raise BundleError("drift check runs the exported model; torch-* runtimes are PyTorch, not the export")
    feed_sets = [graph_feeds(model, feeds) for feeds in inputs]
    setup = dataclasses.replace(runner_setup(model, None, feed_sets[0], Runtimes((runtime,))), weights_dir=weights_dir)
    progress(f"running {runtime} on the bundle's {len(feed_sets)} input iteration(s), as deployed")
    with make_runner(runtime, model, setup) as runner:  # the verdict: the graph as it runs, no taps
        plain = [runner.infer(feeds).outputs for feeds in feed_sets]
    unit = meta.get("rows", "module")
    progress(f"running {runtime} again with {len(layers)} {unit}s tapped, for their statistics")
    with make_runner(runtime, model, setup, taps=list(layers)) as runner:
        result = runner.infer(feed_sets[0])
    count = len(feed_sets)
    report = DriftReport(runtime, [compare_arrays(iteration_name(name, number, count), reference[name], outputs[name],
                                                  *tolerance.of(name))
                                   for number, (reference, outputs) in enumerate(zip(golden, plain), start=1)
                                   for name in meta["outputs"]],
                         tolerance=(tolerance.atol, tolerance.rtol, tolerance.rule),
                         tap_effect=largest_difference(plain[0], result.outputs), unit=unit)
    current = {module: layer_stats(value) for module, value in result.taps.items()}
    report.unmatched = [module for module in layers if module not in current]
    for module, stats in current.items():
        report.layers_checked += 1
        golden_stats = _counterpart_stats(stats, layers[module])
        for stat in STATS:
            if not passes(np.array([golden_stats[stat]]), np.array([stats[stat]]), tolerance.atol, tolerance.rtol,
                          tolerance.rule):
                report.layers.append(LayerDrift(module, stat, golden_stats[stat], stats[stat]))
    if record:
        _append_history(Path(bundle), report, digest, current, layers)
    return report


def _counterpart_stats(current: dict, golden: dict) -> dict:
    """The golden statistics of the tensor the runtime's is: a module that returned several (cos
    and sin) has theirs all recorded, and the graph names one of them; the closest is that one."""
    candidates = [golden, *golden.get("others", [])]
    return min(candidates, key=lambda c: sum(abs(current[s] - c[s]) / (abs(c[s]) + 1e-12) for s in STATS))


def _append_history(bundle: Path, report: DriftReport, digest: str, current: dict, golden_layers: dict) -> None:
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runtime": report.runtime, "model_hash": digest,
        "versions": versions(), "passed": report.passed,
        "outputs": {c.name: c.max_abs for c in report.outputs},
        "atol": report.tolerance[0] if report.tolerance else None,
        "drifted_modules": report.drifted_modules,
        "layers": {m: max(abs(current[m][s] - _counterpart_stats(current[m], golden_layers[m])[s]) for s in STATS)
                   for m in current},
    }
    with locked_folder(bundle):
        append_lines(bundle / HISTORY, [entry])


@dataclass
class History:
    entries: list[dict]  # one per check, oldest first
    damaged: list[int]  # line numbers (from 1) that are not a check's record, skipped


def read_history(bundle) -> History:
    path = Path(bundle) / HISTORY
    if not path.exists():
        return History([], [])
    try:
        return History(*read_lines(path, _is_check))
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path} is not text: a damaged history (move it away to start a new one)") from exc


def _is_check(entry: dict) -> bool:
    return (isinstance(entry.get("time"), str) and isinstance(entry.get("passed"), bool)
            and isinstance(entry.get("outputs"), dict) and isinstance(entry.get("runtime"), str)
            and isinstance(entry.get("model_hash"), str))
