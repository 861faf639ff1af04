"""compare, drift bundles, the pytest plugin and the fp16 overflow finder, on real exports."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from factories import Overflowing
from conftest import export
from ticknorm import ExportOptions, Inputs, LayerSelection, ModelRef, Precision, Tolerance, api
from ticknorm.base.errors import AccuracyError, BundleError, InputSpecError
from ticknorm.base.inputs import load_feed_sets
from ticknorm.base.metrics import CHECK_RULES, compare_arrays
from ticknorm.base.run_results import load_run_results
from ticknorm.runtime.ort_runner import OrtRunner
from ticknorm.cli import main
from ticknorm.exporter.export import export_model
from ticknorm.runtime.registry import RunnerSetup, runtime_statuses
from ticknorm.runtime.torch_runner import TorchRunner
from ticknorm.validate.compare import compare_runtimes
from ticknorm.validate.drift import check_bundle, load_bundle, read_history, write_bundle
from ticknorm.exporter.precision.plan import plan_precision

EXAMPLE = "examples/tiny_transformer.py:build"
CHECKPOINT = "examples/tiny_transformer.safetensors"
FEEDS = {"input_ids": np.random.default_rng(0).integers(0, 1000, (2, 16))}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("validate") / "tiny.onnx"
    api.export(ModelRef(EXAMPLE, CHECKPOINT), Inputs(("input_ids:batch=2xseq=16:int64:0..1000",)), path,
               ExportOptions(exporter="torchscript"))
    return path, onnx.load(str(path))


def _reference(perturb: str | None = None):
    module = ModelRef(EXAMPLE, CHECKPOINT).load()
    if perturb:
        with torch.no_grad():
            module.get_submodule(perturb).weight.mul_(1.05)
    return module


def test_per_layer_compare_passes_on_a_faithful_export(exported):
    _, model = exported
    report = compare(model, _reference(), layers=LayerSelection())
    assert report.passed and report.first_failure == {"ort": None}
    modules = [row.module for row in report.layers]
    assert modules.index("layers.0.attention_norm") < modules.index("layers.1.output_norm") < modules.index("head")
    assert report.tap_effect["ort"] < 1e-5


def test_first_module_over_tolerance_is_named(exported):
    _, model = exported
    report = compare(model, _reference("layers.1.feed_forward.2"), layers=LayerSelection())
    assert not report.passed
    assert report.first_failure["ort"] == "layers.1.feed_forward.2"
    failing = [row.module for row in report.layers if row.comparison and not row.comparison.passed]
    assert "layers.0.output_norm" not in failing and "layers.1" in failing
    shallow = compare(model, _reference("layers.1.feed_forward.2"), layers=LayerSelection(depth=2))
    assert shallow.first_failure["ort"] == "layers.1"
    assert {row.module for row in shallow.layers} == {"embeddings", "layers.0", "layers.1", "final_norm", "head"}
    only = compare(model, _reference(), layers=LayerSelection(pattern="layers.*.output_norm"))
    assert {row.module for row in only.layers} == {"layers.0.output_norm", "layers.1.output_norm"}


def test_per_output_tolerance_and_cli_exit_codes(exported, tmp_path):
    path, model = exported
    loose = compare(model, _reference("head"), tolerance=Tolerance(per_output={"output": (1.0, 1.0)}))
    assert loose.passed
    args = ["compare", str(path), "--model", EXAMPLE, "--checkpoint", CHECKPOINT, "--input", "input_ids:2x16:int64:0..1000"]
    ok = CliRunner().invoke(main, args + ["--per-layer", "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "r.json").read_text())["first_failure"] == {"ort": None}
    bad_input = CliRunner().invoke(main, args[:-1] + ["input_ids:2x16:int32"])
    assert bad_input.exit_code == 2 and "is int32, the model takes int64" in bad_input.stderr
    absent = next((s.name for s in runtime_statuses() if not s.available and s.name != "torch-cuda"), None)
    if absent is None:
        pytest.skip("every runtime is available on this machine: none to be refused")
    missing = CliRunner().invoke(main, args + ["--runtime", f"ort,{absent}"])
    assert missing.exit_code == 2 and f"{absent.removesuffix('-cpu')}" in missing.stderr  # refused with the reason
    assert "running" not in missing.stderr  # before any work


def test_nan_reference_is_an_error(tmp_path):
    module = nn.Sequential(nn.Linear(4, 4))
    feeds = {"input": np.full((2, 4), np.nan, np.float32)}
    model = export(module, feeds, "torchscript")
    with pytest.raises(AccuracyError, match="NaN or Inf"):
        compare(model, module, feeds=feeds)


def test_drift_snapshot_check_history_and_plot(exported, tmp_path):
    path, model = exported
    bundle = write_bundle(model, _reference(), FEEDS, tmp_path / "golden")
    assert sorted(p.name for p in bundle.iterdir()) == ["bundle.json", "inputs.json", "manifest.json", "outputs.json"]
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["versions"]["onnxruntime"] and "layers.1.output_norm" in meta["layers"]
    assert check_bundle(bundle, model).passed
    drifted = _drifted_model(model)
    with pytest.raises(BundleError, match="--allow-model-change"):
        check_bundle(bundle, drifted)
    report = check_bundle(bundle, drifted, allow_model_change=True)
    assert not report.passed and report.drifted_modules == ["head"]  # modules counted as modules
    text = report.text()
    assert f"{report.layers_checked} modules checked, 1 drifted ({len(report.layers)} statistics); first drifted " \
           "module: head" in text
    assert len([line for line in text.splitlines() if line.strip().startswith("head ")]) == 1  # one line per module
    assert "(atol 0.0001, rtol 0.001, ticknorm rule)" in text
    assert "the verdict is the untapped run's; tapping moved the outputs by at most" in text
    assert [e["passed"] for e in read_history(bundle).entries] == [True, False]
    result = CliRunner().invoke(main, ["drift", "history", str(bundle), "--plot", str(tmp_path / "h.png")])
    assert result.exit_code == 0 and (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def compare(model, module, feeds=FEEDS, **options):
    return compare_runtimes(model, feeds, ["ort"], RunnerSetup(module), **options)


def _drifted_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with the head's weight nudged, as a re-export with other numerics would be."""
    drifted = onnx.ModelProto()
    drifted.CopyFrom(model)
    for tensor in drifted.graph.initializer:
        if tensor.name == "head.weight":
            tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor) * 1.01, tensor.name))
    return drifted


def test_drift_cli_exit_codes(exported, tmp_path):
    path, model = exported
    bundle = tmp_path / "golden"
    common = ["--model", EXAMPLE, "--checkpoint", CHECKPOINT, "--input", "input_ids:2x16:int64:0..1000"]
    assert CliRunner().invoke(main, ["drift", "snapshot", str(path), *common, "-o", str(bundle)]).exit_code == 0
    assert CliRunner().invoke(main, ["drift", "check", str(bundle), str(path)]).exit_code == 0
    onnx.save(_drifted_model(model), str(tmp_path / "drifted.onnx"))
    other = CliRunner().invoke(main, ["drift", "check", str(bundle), str(tmp_path / "drifted.onnx")])
    assert other.exit_code == 2 and "the bundle was made for model" in other.stderr
    moved = CliRunner().invoke(main, ["drift", "check", str(bundle), str(tmp_path / "drifted.onnx"), "--allow-model-change"])
    assert moved.exit_code == 1 and "DRIFT" in moved.output
    broken = CliRunner().invoke(main, ["drift", "check", str(tmp_path), str(path)])
    assert broken.exit_code == 2 and "is not a ticknorm bundle" in broken.stderr


def test_polygraphy_reads_the_bundle(exported, tmp_path):
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import load_json

    path, model = exported
    bundle = write_bundle(model, _reference(), FEEDS, tmp_path / "golden")
    tool = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    done = subprocess.run([tool, "run", str(path), "--onnxrt", "--load-inputs",
                           str(bundle / "inputs.json"), "--load-outputs", str(bundle / "outputs.json"),
                           "--atol", "1e-4", "--rtol", "1e-3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED" in done.stdout
    # Polygraphy's own types, both ways: its loaders read the files, ticknorm hands back its IterationResults
    results, inputs = RunResults.load(str(bundle / "outputs.json")), load_json(str(bundle / "inputs.json"))
    assert list(results.keys()) == ["torch"] and np.array_equal(inputs[0]["input_ids"], FEEDS["input_ids"])
    _, _, references = load_bundle(bundle)
    assert all(isinstance(iteration, IterationResult) for iteration in references)
    assert np.array_equal(references[0]["output"], results["torch"][0]["output"])


def test_the_polygraphy_mode_gives_polygraphy_runs_own_verdict(exported, tmp_path):
    """A reference moved off ORT's outputs half-way from Polygraphy's bar, max(atol, rtol*|value|),
    to ticknorm's, their sum: ticknorm's rule passes it, Polygraphy's fails it, and `drift check` of a
    bundle in mode `polygraphy` says what `polygraphy run --load-outputs` says of the same files."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    path, model = exported
    with OrtRunner(model) as runner:
        outputs = runner.infer(FEEDS).outputs
    moved = RunResults()
    band = {name: (np.maximum(1e-4, 1e-3 * np.abs(v)), np.minimum(1e-4, 1e-3 * np.abs(v))) for name, v in outputs.items()}
    moved.add([{name: (v + band[name][0] + band[name][1] / 2).astype(v.dtype) for name, v in outputs.items()}],
              runner_name="onnxrt-runner-N0")
    moved.save(str(tmp_path / "outputs.json"))
    save_json([FEEDS], str(tmp_path / "inputs.json"))
    files = ["--input-file", str(tmp_path / "inputs.json"), "--reference-outputs", str(tmp_path / "outputs.json")]
    verdicts = {}
    for mode in CHECK_RULES:
        made = CliRunner().invoke(main, ["drift", "snapshot", str(path), *files, "--check-mode", mode, "-o", str(tmp_path / mode)])
        assert made.exit_code == 0, made.output
        verdicts[mode] = CliRunner().invoke(main, ["drift", "check", str(tmp_path / mode), str(path), "--no-history"]).exit_code
    assert verdicts == {"ticknorm": 0, "polygraphy": 1}
    tool = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")
    done = subprocess.run([tool, "run", str(path), "--onnxrt", "--load-inputs", str(tmp_path / "inputs.json"),
                           "--load-outputs", str(tmp_path / "outputs.json"), "--atol", "1e-4", "--rtol", "1e-3"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "FAILED" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def test_pytest_plugin_fixture_in_a_users_suite(exported, tmp_path):
    path, model = exported
    bundle = write_bundle(model, _reference(), FEEDS, tmp_path / "golden")
    onnx.save(_drifted_model(model), str(tmp_path / "drifted.onnx"))
    (tmp_path / "test_user.py").write_text(textwrap.dedent(f"""
        def test_same(ticknorm_drift):
            ticknorm_drift({str(bundle)!r}, {str(path)!r})

        def test_drifted(ticknorm_drift):
            ticknorm_drift({str(bundle)!r}, {str(tmp_path / 'drifted.onnx')!r}, allow_model_change=True)
    """))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_user.py")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert "1 failed, 1 passed" in done.stdout, done.stdout[-3000:]
    assert "drifted from" in done.stdout


def test_fp16_overflowing_layer_norm_is_found_and_fp32_fixes_it(tmp_path):
    module = Overflowing().eval()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 6, 16)).astype(np.float32)}
    path = tmp_path / "o.onnx"
    export_model(module, feeds, path, ExportOptions(exporter="torchscript"))
    rows = plan_precision(onnx.load(str(path)), feeds, Precision("fp16")).islands
    assert [row.module for row in rows] == ["norm"]
    assert rows[0].reason.startswith("mean of squares reaches") and rows[0].reason.endswith("> fp16 max 65504")
    reference = _torch_run(TorchRunner(Overflowing(), ["y"]), feeds)
    broken = _torch_run(TorchRunner(Overflowing(), ["y"], dtype="fp16"), feeds).astype(np.float32)
    assert not np.allclose(broken, reference, atol=0.5)  # the variance overflowed: garbage, not rounding
    kept = _torch_run(TorchRunner(Overflowing(), ["y"], dtype="fp16", fp32_modules=[r.module for r in rows]), feeds)
    np.testing.assert_allclose(kept, reference, atol=2e-2, rtol=2e-2)
    np.savez(tmp_path / "in.npz", **feeds)
    result = CliRunner().invoke(main, ["compare", str(path), "--model", "tests/factories.py:overflowing", "--input-file",
                                       str(tmp_path / "in.npz"), "--runtime", "torch-fp16", "--atol", "2e-2", "--rtol", "2e-2"])
    assert result.exit_code == 0, result.output
    assert "kept in fp32 for fp16: norm [/norm/LayerNormalization]: mean of squares reaches" in result.output
    assert "torch-fp16 vs torch (atol 0.02, rtol 0.02):" in result.output and "PASS" in result.output
    # report applies the same precision policy as compare: the same module passes on both
    rows = tmp_path / "rows.json"
    page = CliRunner().invoke(main, ["report", str(path), "--model", "tests/factories.py:overflowing", "--input-file",
                                     str(tmp_path / "in.npz"), "--runtime", "torch,torch-fp16", "--atol", "2e-2",
                                     "--rtol", "2e-2", "--iterations", "2", "--warmup", "0", "-o",
                                     str(tmp_path / "r.html"), "--json", str(rows)])
    assert page.exit_code == 0, page.output
    norm = next(row for row in json.loads(rows.read_text())["rows"] if row["module"] == "norm")
    assert norm["passed"] == {"torch-fp16": True}


def _torch_run(runner: TorchRunner, feeds: dict) -> np.ndarray:
    with runner:
        return runner.infer(feeds).outputs["y"]


def test_damaged_bundles_and_bad_tolerances_are_one_line_errors(exported, tmp_path):
    path, model = exported
    bundle = write_bundle(model, _reference(), FEEDS, tmp_path / "golden")
    (bundle / "outputs.json").write_text('{"lst": []}')
    result = CliRunner().invoke(main, ["drift", "check", str(bundle), str(path)])
    assert result.exit_code == 2 and "damaged bundle" in result.stderr
    bad = CliRunner().invoke(main, ["compare", str(path), "--model", EXAMPLE, "--input", "input_ids:2x16:int64",
                                    "--output-tol", "abc"])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --output-tol 'abc' is not NAME:ATOL:RTOL"


def test_check_modes_give_polygraphys_verdict_when_asked():
    """Polygraphy fails a value only when both its absolute and relative error are over; ticknorm
    when the absolute error is over atol + rtol*|ref|: 10.015 against 10 at atol 1e-2, rtol 1e-3
    passes one and fails the other."""
    reference, actual = np.array([10.0, 0.0]), np.array([10.015, 0.0])
    assert compare_arrays("y", reference, actual, 1e-2, 1e-3).passed
    strict = compare_arrays("y", reference, actual, 1e-2, 1e-3, "polygraphy")
    assert not strict.passed and "Polygraphy's rule" in strict.reason
    with pytest.raises(InputSpecError, match="unknown check mode 'numpy'"):
        Tolerance(rule="numpy")


@pytest.mark.parametrize("reference, actual, atol, rtol, ticknorm, polygraphy", [
    (1.0, 1.0005, 1e-4, 1e-3, True, True),  # agree: well inside, well outside
    (1.0, 1.01, 1e-4, 1e-3, False, False),
    (1e-6, 5e-5, 1e-4, 1e-3, True, True),  # small references: atol holds in both
    (1e-6, 2e-4, 1e-4, 1e-3, False, False),
    (0.0, 5e-5, 1e-4, 1e-3, True, True),  # zeros: atol holds in both
    (0.0, 2e-4, 1e-4, 1e-3, False, False),
    (1.0, np.nan, 1e-4, 1e-3, False, False),  # a NaN error fails both
    (0.1, 0.10015, 1e-4, 1e-3, True, False),  # over max(atol, rtol*|ref|), within their sum: |ref| = atol/rtol
    (10.0, 10.015, 1e-2, 1e-3, True, False),
    (0.0, 1e-20, 0.0, 1e-3, False, True),  # a zero at atol 0: Polygraphy divides by 2.2e-16 instead
])
def test_ticknorms_rule_beside_polygraphys(reference, actual, atol, rtol, ticknorm, polygraphy):
    """The two check modes on the same values, as metrics.CHECK_RULES documents them: they part
    only where the error is over both max(atol, rtol*|ref|) and within atol + rtol*|ref|, and on a
    zero reference at atol 0; `polygraphy` is Polygraphy's own SimpleCompareFunc."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc

    from ticknorm.base.metrics import passes

    ref, out = np.array([reference]), np.array([actual])
    assert passes(ref, out, atol, rtol) == ticknorm
    assert passes(ref, out, atol, rtol, "polygraphy") == polygraphy
    own = SimpleCompareFunc(atol=atol, rtol=rtol)(IterationResult({"y": out}), IterationResult({"y": ref}))
    assert bool(own["y"]) == polygraphy
    if np.isfinite(actual):
        assert compare_arrays("y", ref, out, atol, rtol).passed == ticknorm
        assert compare_arrays("y", ref, out, atol, rtol, "polygraphy").passed == polygraphy


def test_nan_and_inf_are_placed_before_either_rule_judges():
    """NaN and Inf in the same places pass in both modes and the finite values are judged: Polygraphy's
    own check on the whole arrays fails a NaN (and a matching Inf) even where the reference has it."""
    from polygraphy.comparator import IterationResult, SimpleCompareFunc

    reference, actual = np.array([1.0, np.nan, -np.inf]), np.array([1.00001, np.nan, -np.inf])
    for rule in CHECK_RULES:
        found = compare_arrays("y", reference, actual, 1e-4, 1e-3, rule)
        assert found.passed and found.max_abs == pytest.approx(1e-5)
        assert not compare_arrays("y", reference, np.array([1.0, 0.0, -np.inf]), 1e-4, 1e-3, rule).passed
    with np.errstate(invalid="ignore"):
        own = SimpleCompareFunc(atol=1e-4, rtol=1e-3)(IterationResult({"y": actual}), IterationResult({"y": reference}))
    assert not own["y"]


def test_bundles_keep_their_check_mode_and_read_polygraphy_written_outputs(exported, tmp_path):
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json

    path, model = exported
    common = ["--model", EXAMPLE, "--checkpoint", CHECKPOINT, "--input", "input_ids:2x16:int64:0..1000"]
    bundle = tmp_path / "golden"
    done = CliRunner().invoke(main, ["drift", "snapshot", str(path), *common, "--check-mode", "polygraphy", "-o", str(bundle)])
    assert done.exit_code == 0, done.output
    assert json.loads((bundle / "bundle.json").read_text())["tolerances"]["rule"] == "polygraphy"
    checked = CliRunner().invoke(main, ["drift", "check", str(bundle), str(path)])
    assert checked.exit_code == 0 and "polygraphy rule" in checked.output
    with OrtRunner(model) as runner:  # what `polygraphy run --onnxrt --save-outputs` writes: its own runner name
        outputs = runner.infer(FEEDS).outputs
    written = RunResults()
    written.append(("onnxrt-runner-N0-12/04/26-17:00:00", [IterationResult(outputs, runner_name="onnxrt-runner-N0")]))
    save_json(written, str(tmp_path / "outputs.json"))
    save_json([FEEDS], str(tmp_path / "inputs.json"))
    # a bundle made from Polygraphy's files (no PyTorch model): its outputs are the reference
    made = CliRunner().invoke(main, ["drift", "snapshot", str(path), "--input-file", str(tmp_path / "inputs.json"),
                                     "--reference-outputs", str(tmp_path / "outputs.json"), "-o", str(tmp_path / "poly")])
    assert made.exit_code == 0, made.output
    assert CliRunner().invoke(main, ["drift", "check", str(tmp_path / "poly"), str(path)]).exit_code == 0
    # a file swapped into a bundle by hand is no longer the bundle its manifest describes
    shutil.copyfile(tmp_path / "outputs.json", bundle / "outputs.json")
    swapped = CliRunner().invoke(main, ["drift", "check", str(bundle), str(path)])
    assert swapped.exit_code == 2 and "incomplete or damaged bundle" in swapped.stderr and "outputs.json" in swapped.stderr
    assert len(swapped.stderr.strip().splitlines()) == 1


def test_every_iteration_of_a_polygraphy_inputs_file_is_judged(exported, tmp_path):
    from polygraphy.json import save_json

    path, _ = exported
    rng = np.random.default_rng(3)
    save_json([{"input_ids": rng.integers(0, 1000, (2, 16))} for _ in range(2)], str(tmp_path / "inputs.json"))
    common = [str(path), "--model", EXAMPLE, "--checkpoint", CHECKPOINT, "--input-file", str(tmp_path / "inputs.json")]
    compared = CliRunner().invoke(main, ["compare", *common])
    assert compared.exit_code == 0, compared.output
    assert "output (iteration 1)" in compared.output and "output (iteration 2)" in compared.output
    bundle = tmp_path / "golden"
    assert CliRunner().invoke(main, ["drift", "snapshot", *common, "-o", str(bundle)]).exit_code == 0
    assert len(load_feed_sets(bundle)) == 2  # every iteration, with its reference
    checked = CliRunner().invoke(main, ["drift", "check", str(bundle), str(path)])
    assert checked.exit_code == 0 and "output (iteration 2)" in checked.output
    again = CliRunner().invoke(main, ["compare", str(path), "--model", EXAMPLE, "--checkpoint", CHECKPOINT,
                                      "--input-file", str(bundle)])  # a bundle folder as the inputs
    assert again.exit_code == 0 and "output (iteration 2)" in again.output


def test_compare_against_outputs_polygraphy_saved(exported, tmp_path):
    """`polygraphy run --onnxrt --save-inputs/--save-outputs` made the files; ticknorm judges its
    runtimes against those outputs with no PyTorch model, and with it when asked per module."""
    from polygraphy.json import save_json

    path, model = exported
    inputs, outputs = tmp_path / "inputs.json", tmp_path / "outputs.json"
    made = subprocess.run(["polygraphy", "run", str(path), "--onnxrt", "--val-range", "input_ids:[0,999]",
                           "--input-shapes", "input_ids:[2,16]", "--iterations", "2", "--save-inputs", str(inputs),
                           "--save-outputs", str(outputs)], capture_output=True, text=True)
    assert made.returncode == 0, made.stdout + made.stderr
    saved = ["compare", str(path), "--input-file", str(inputs), "--reference-outputs", str(outputs)]
    alone = CliRunner().invoke(main, saved)
    assert alone.exit_code == 0, alone.output
    assert "ort vs outputs.json: onnxrt-runner-N0" in alone.output
    assert "output (iteration 2): max abs 0," in alone.output  # the same runtime, the same numbers
    with_model = CliRunner().invoke(main, [*saved, "--model", EXAMPLE, "--checkpoint", CHECKPOINT, "--runtime",
                                           "torch,ort", "--per-layer", "--depth", "2"])
    assert with_model.exit_code == 0, with_model.output
    assert "torch vs outputs.json" in with_model.output and "per module" in with_model.output
    # a reference that disagrees fails; files that do not fit are one line, exit 2
    results = load_run_results(outputs)
    for iteration in results[list(results.keys())[0]]:
        iteration["output"] = iteration["output"] + 1.0
    save_json(results, str(tmp_path / "shifted.json"))
    shifted = CliRunner().invoke(main, ["compare", str(path), "--input-file", str(inputs), "--reference-outputs",
                                        str(tmp_path / "shifted.json")])
    assert shifted.exit_code == 1 and "FAIL" in shifted.output
    np.savez(tmp_path / "one.npz", **FEEDS)
    (tmp_path / "broken.json").write_text("{not json")
    for args, message in [
        (["--input-file", str(tmp_path / "one.npz"), "--reference-outputs", str(outputs)], "holds 2 iteration(s) of outputs for 1"),
        (["--input-file", str(inputs), "--reference-outputs", str(tmp_path / "broken.json")], "is not a readable Polygraphy RunResults file"),
        (["--input-file", str(inputs), "--reference-outputs", str(tmp_path / "none.json")], "reference outputs file not found"),
        (["--input-file", str(inputs), "--reference-outputs", str(outputs), "--reference-runner", "trt"], "holds no runner 'trt'; it has onnxrt-runner-N0"),
        (["--input-file", str(inputs), "--reference-outputs", str(outputs), "--reference", "ort"],
         "--reference and --reference-outputs both name the reference"),
        (["--input-file", str(inputs), "--reference-outputs", str(outputs), "--per-layer"], "per-module comparison taps the PyTorch model"),
    ]:
        bad = CliRunner().invoke(main, ["compare", str(path), *args])
        assert bad.exit_code == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, (args, bad.output)


def test_a_file_onnx_runtime_optimized_counts_its_fused_norms_and_compares(tmp_path):
    """ONNX Runtime's own fused norms (com.microsoft SkipLayerNormalization) count as fused, and a
    file holding com.microsoft ops runs through inspect, fuse and compare."""
    import onnxruntime

    path = tmp_path / "dynamo.onnx"  # ORT fuses Add + LayerNormalization in the dynamo exporter's graph
    api.export(ModelRef(EXAMPLE, CHECKPOINT), Inputs(("input_ids:2x16:int64:0..1000",)), path)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    summary = api.inspect(tmp_path / "ort.onnx")
    assert summary.op_histogram.get("com.microsoft::SkipLayerNormalization", 0) >= 1
    assert summary.fused_norms == 5 and summary.decomposed_norms == 0
    result, _ = api.fuse(tmp_path / "ort.onnx", tmp_path / "again.onnx")
    assert result.report.count("fused") == 0  # nothing left to fuse, and the file is written as it was
    report = api.compare(tmp_path / "ort.onnx", ModelRef(EXAMPLE, CHECKPOINT), Inputs(("input_ids:2x16:int64:0..1000",)))
    assert report.passed


def test_outputs_are_matched_by_name_when_a_file_orders_them_otherwise(tmp_path):
    """A decoder file whose outputs come in another order than the model returns them (logits last):
    compare pairs them by name, not by position."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hf_models import build

    model = build("LlamaForCausalLM")
    path = tmp_path / "decoder.onnx"
    api.export(ModelRef(model), Inputs(("input_ids:batch=1xseq=4:int64:0..128",)), path,
               ExportOptions(task="text-generation-with-past"))
    graph = onnx.load(str(path))
    outputs = list(graph.graph.output)
    del graph.graph.output[:]
    graph.graph.output.extend(outputs[1:] + outputs[:1])
    onnx.save(graph, str(tmp_path / "reordered.onnx"))
    report = api.compare(tmp_path / "reordered.onnx", ModelRef(model), Inputs(("input_ids:1x2:int64:0..128",)))
    assert report.passed and report.outputs["ort"][-1].name == "logits"
