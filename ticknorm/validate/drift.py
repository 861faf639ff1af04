"""Golden bundles and numeric-drift checks.

A bundle is a folder: `inputs.json` (Polygraphy's input format, a list of feed dicts, so
`polygraphy run --load-inputs` reads it), `outputs.json` (Polygraphy RunResults holding the PyTorch
reference, readable by `polygraphy run --load-outputs`), `bundle.json` (model hash, versions,
tolerances, per-module output statistics and, when a ticks file was given, under `calibration` the
ranges each norm reached in training) and `history.jsonl` (one line per check).
"""

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ticknorm.base.atomic import write_text
from ticknorm.base.errors import BundleError, InputSpecError, first_line
from ticknorm.base.scopes import module_output_tensors
from ticknorm.base.onnx_io import model_digest
from ticknorm.base.inputs import as_feed_sets, graph_feeds, load_feed_sets
from ticknorm.base.run_results import load_run_results, runner_outputs
from ticknorm.base.metrics import Tolerance, compare_arrays, ensure_finite, within
from ticknorm.base.scopes import LayerSelection
from ticknorm.base.text_table import render
from ticknorm.base.precision import TYPE_NAMES
from ticknorm.exporter.precision.targets import runner_setup
from ticknorm.runtime.registry import Runtimes, make_runner, runtime_precision
from ticknorm.runtime.torch_runner import TorchRunner
from ticknorm.ticks.log import read_ticks
from ticknorm.ticks.ranges import module_ranges, present_ranges
from ticknorm.validate.compare import TAP_EFFECT_LIMIT, iteration_name, largest_difference

FORMAT = 1
STATS = ("mean", "std", "absmax")


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


def write_bundle(model: onnx.ModelProto, module, feeds, bundle, tolerance: Tolerance | None = None,
                 layers: LayerSelection = LayerSelection(), progress=lambda message: None, calibration=None) -> Path:
    """Run the PyTorch reference on `feeds` (one feed dict, or one per iteration) and write the
    bundle; the per-module statistics are the first iteration's. `calibration`: a ticks file whose
    per-module peaks are kept too, the ranges of the training data beside those of these inputs."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import to_json

    tolerance = tolerance or Tolerance()
    trained = _calibration(calibration, module) if calibration is not None else None  # refused before the run
    bundle = Path(bundle)
    names = [o.name for o in model.graph.output]
    scope_map = module_output_tensors(model)
    feed_sets = as_feed_sets(feeds)
    progress(f"running the PyTorch reference on {len(feed_sets)} iteration(s), every module tapped")
    with TorchRunner(module, names, taps=layers.modules(model, (name for name, _ in module.named_modules()))) as runner:
        references = [runner.infer(feed_set) for feed_set in feed_sets]
    for reference in references:
        ensure_finite(reference.outputs, "the PyTorch reference")
    reference = references[0]
    results = RunResults()
    results.append(("torch", [IterationResult(r.outputs, runner_name="torch") for r in references]))
    meta = {
        "format": FORMAT, "model_hash": model_digest(model), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(), "outputs": names,
        "tolerances": {"atol": tolerance.atol, "rtol": tolerance.rtol, "per_output": tolerance.per_output,
                       "rule": tolerance.rule},
        "layers": {m: {"tensor": scope_map[m], **layer_stats(v)} for m, v in reference.taps.items()},
    }
    if trained is not None:
        meta["calibration"] = trained
    bundle.mkdir(parents=True, exist_ok=True)
    write_text(bundle / "inputs.json", to_json(feed_sets))
    write_text(bundle / "outputs.json", to_json(results))
    write_text(bundle / "bundle.json", json.dumps(meta, indent=2))
    return bundle


def _calibration(path, module) -> dict:
    names = [name for name, _ in module.named_modules()]
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
    outputs: list = field(default_factory=list)  # ArrayComparison vs the golden reference
    layers: list = field(default_factory=list)  # LayerDrift rows that moved beyond tolerance, in model order
    layers_checked: int = 0
    unmatched: list = field(default_factory=list)  # bundle modules this graph has no output tensor for
    tolerance: tuple = ()  # (atol, rtol, rule) the check used
    tap_effect: float = 0.0  # max |tapped - untapped| of the outputs: what tapping changed in this runtime

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
        head = f"{self.runtime} vs golden reference" + (f" (atol {atol:g}, rtol {rtol:g}, {rule} rule)" if atol is not None else "")
        lines = [head + ":"] + ["  " + c.line() for c in self.outputs]
        drifted = self.drifted_modules
        lines.append(f"per-module statistics: {self.layers_checked} modules checked, {len(drifted)} drifted"
                     + (f" ({len(self.layers)} statistics); first drifted module: {drifted[0] or '(root)'}" if drifted else ""))
        if drifted:
            rows = []
            for module in drifted:
                moved = [row for row in self.layers if row.module == module]
                worst = max(moved, key=lambda row: abs(row.current - row.reference) / max(abs(row.reference), 1e-12))
                rows.append([module or "(root)", worst.stat, f"{worst.reference:.6g}", f"{worst.current:.6g}",
                             f"+{len(moved) - 1}" if len(moved) > 1 else ""])
            lines += ["  " + line for line in render(["module", "statistic", "golden", "now", "more"], rows, 2).splitlines()]
        if self.unmatched:
            lines.append(f"not checked, no output tensor for them in this graph: {', '.join(self.unmatched)}")
        flag = "; WARNING: the statistics may not be what an untapped run computes" if self.tap_effect > TAP_EFFECT_LIMIT else ""
        lines.append(f"the verdict is the untapped run's; tapping moved the outputs by at most {self.tap_effect:.3g}{flag}")
        lines.append("PASS" if self.passed else "DRIFT")
        return "\n".join(lines)


def load_bundle(bundle) -> tuple[dict, list, list]:
    """(meta, a feed dict per iteration, the reference outputs per iteration). The reference is the
    `torch` runner's, or, in an outputs.json Polygraphy wrote (`polygraphy run --save-outputs`),
    its only runner's."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"bundle folder not found: {bundle}")
    for name in ("bundle.json", "inputs.json", "outputs.json"):
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle} is not a ticknorm bundle: {name} is missing")
    try:
        meta = json.loads((bundle / "bundle.json").read_text())
        feeds = load_feed_sets(bundle / "inputs.json")
        _, references = runner_outputs(load_run_results(bundle / "outputs.json"), bundle / "outputs.json")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{bundle} is a damaged bundle: bundle.json is not JSON ({first_line(exc)})") from exc
    except InputSpecError as exc:
        raise BundleError(f"{bundle} is a damaged bundle or not a ticknorm one: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BundleError(f"{bundle} is not a bundle of format {FORMAT}")
    missing = [key for key in ("model_hash", "outputs", "tolerances", "layers") if key not in meta]
    if len(references) != len(feeds):
        missing.append(f"one reference per input iteration ({len(feeds)} inputs, {len(references)} references)")
    if missing:
        raise BundleError(f"{bundle} is a damaged bundle: {', '.join(missing)} missing")
    return meta, feeds, references


def check_bundle(bundle, model: onnx.ModelProto, runtime: str = "ort", allow_model_change: bool = False,
                 progress=lambda message: None) -> DriftReport:
    """Re-run `model` on the stored inputs and compare with the stored reference; appends to the
    bundle's history whatever the verdict."""
    meta, inputs, golden = load_bundle(bundle)
    digest = model_digest(model)
    if digest != meta["model_hash"] and not allow_model_change:
        raise BundleError(f"the bundle was made for model {meta['model_hash'][:12]}, this model is {digest[:12]}; "
                          "pass --allow-model-change to check a re-exported model against it")
    tolerances = meta["tolerances"]
    tolerance = Tolerance(tolerances["atol"], tolerances["rtol"], {k: tuple(v) for k, v in tolerances["per_output"].items()},
                          tolerances.get("rule", "ticknorm"))
    tolerance = tolerance.at(TYPE_NAMES[runtime_precision(runtime, model)])
    layers = meta["layers"]
    if runtime.startswith("torch"):
        raise BundleError("drift check runs the exported model; torch-* runtimes are PyTorch, not the export")
    feed_sets = [graph_feeds(model, feeds) for feeds in inputs]
    setup = runner_setup(model, None, feed_sets[0], Runtimes((runtime,)))
    progress(f"running {runtime} on the bundle's {len(feed_sets)} input iteration(s), as deployed")
    with make_runner(runtime, model, setup) as runner:  # the verdict: the graph as it runs, no taps
        plain = [runner.infer(feeds).outputs for feeds in feed_sets]
    progress(f"running {runtime} again with {len(layers)} modules tapped, for their statistics")
    with make_runner(runtime, model, setup, taps=list(layers)) as runner:
        result = runner.infer(feed_sets[0])
    count = len(feed_sets)
    report = DriftReport(runtime, [compare_arrays(iteration_name(name, number, count), reference[name], outputs[name],
                                                  *tolerance.of(name))
                                   for number, (reference, outputs) in enumerate(zip(golden, plain), start=1)
                                   for name in meta["outputs"]],
                         tolerance=(tolerance.atol, tolerance.rtol, tolerance.rule),
                         tap_effect=largest_difference(plain[0], result.outputs))
    current = {module: layer_stats(value) for module, value in result.taps.items()}
    report.unmatched = [module for module in layers if module not in current]
    for module, stats in current.items():
        report.layers_checked += 1
        golden_stats = layers[module]
        for stat in STATS:
            moved = np.array([abs(stats[stat] - golden_stats[stat])])
            if not within(moved, np.array([golden_stats[stat]]), tolerance.atol, tolerance.rtol, tolerance.rule).all():
                report.layers.append(LayerDrift(module, stat, golden_stats[stat], stats[stat]))
    _append_history(Path(bundle), report, digest, current, layers)
    return report


def _append_history(bundle: Path, report: DriftReport, digest: str, current: dict, golden_layers: dict) -> None:
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runtime": report.runtime, "model_hash": digest,
        "versions": versions(), "passed": report.passed,
        "outputs": {c.name: c.max_abs for c in report.outputs}, "atol": report.tolerance[0],
        "drifted_modules": report.drifted_modules,
        "layers": {m: max(abs(current[m][s] - golden_layers[m][s]) for s in STATS) for m in current},
    }
    with open(bundle / "history.jsonl", "a") as history_file:  # one appended line: concurrent checks keep theirs
        history_file.write(json.dumps(entry) + "\n")


def read_history(bundle) -> list[dict]:
    path = Path(bundle) / "history.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
