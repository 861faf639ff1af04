"""Runners on real sessions; the TensorRT logic that runs without TensorRT; TensorRT itself where present."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from conftest import export, ort_run
from factories import Small
from ticknorm.base.errors import InputSpecError, RuntimeUnavailable, TicknormError
from ticknorm.base.onnx_io import model_digest
from ticknorm.runtime.ort_runner import MappedWeights, OrtRunner
from ticknorm.cli import main
from ticknorm.runtime import registry
from ticknorm.runtime.kind import RunnerRequest, RuntimeKind, RuntimeStatus
from ticknorm.runtime.registry import RunnerSetup, make_runner, runtime_statuses
from ticknorm.runtime.torch_runner import TorchRunner
from ticknorm.plugins.trt_plugin import kernel_source_digest
from ticknorm.runtime.trt_runner import TrtSettings, engine_cache_key, optimization_profile

FACTORIES = Path(__file__).resolve().parent / "factories.py"


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    module = Small().eval()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)}
    return module, export(module, feeds, "torchscript", dynamic_axes={"x": {0: "batch"}}), feeds


def test_ort_runner_checks_inputs_against_the_model(small):
    _, model, feeds = small
    with OrtRunner(model) as runner:
        assert runner.infer(feeds).outputs[model.graph.output[0].name].shape == (2, 8)
        assert runner.infer({"x": np.zeros((5, 8), np.float32)}).outputs  # dynamic batch
        for bad, match in [({"x": feeds["x"].astype(np.float64)}, "is float64, the model takes float32"),
                           ({"x": np.zeros((2, 9), np.float32)}, r"axis 1 is fixed at 8"),
                           ({"x": np.zeros((8,), np.float32)}, "takes rank 2"),
                           ({"y": feeds["x"]}, "missing x; unexpected y")]:
            with pytest.raises(InputSpecError, match=match):
                runner.infer(bad)
    with pytest.raises(TicknormError, match="is not active"):
        runner.infer(feeds)


def test_ort_taps_are_modules_and_leave_the_outputs_unchanged(small):
    _, model, feeds = small
    with OrtRunner(model, optimization="all", taps=["proj", "no.such.module"]) as runner:
        tapped = runner.infer(feeds)
        assert len(runner.session.get_outputs()) == 2  # one session: graph output + the tapped tensor
    assert set(tapped.taps) == {"proj"} and tapped.taps["proj"].shape == (2, 8)
    for name, value in ort_run(model, feeds).items():
        np.testing.assert_array_equal(value, tapped.outputs[name])


def test_a_graph_read_alone_runs_with_taps_on_the_weights_in_its_file(tmp_path):
    """Compare and profile read a file's graph alone (`graph_only`): ONNX Runtime maps the weights
    the graph references from the file's folder, also when taps make it a session of its own; the
    outputs and taps are those of the model read whole."""
    from ticknorm.base.onnx_io import has_external_weights, load_onnx

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 32)).eval()
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    onnx.save(export(module, feeds, "torchscript"), tmp_path / "m.onnx")
    whole, alone = load_onnx(tmp_path / "m.onnx"), load_onnx(tmp_path / "m.onnx", weights=False)
    assert has_external_weights(alone) and not has_external_weights(whole)
    with OrtRunner(whole, taps=["1"]) as reference, OrtRunner(alone, taps=["1"], model_file=str(tmp_path / "m.onnx"),
                                                              mapped=MappedWeights(str(tmp_path))) as mapped:
        expected, found = reference.infer(feeds), mapped.infer(feeds)
    assert set(found.taps) == {"1"}
    for name, value in expected.outputs.items():
        np.testing.assert_allclose(found.outputs[name], value, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(found.taps["1"], expected.taps["1"], rtol=1e-6, atol=1e-6)


def test_torch_runner_matches_ort_and_taps_modules(small):
    module, model, feeds = small
    names = [o.name for o in model.graph.output]
    with TorchRunner(module, names, taps=["proj"]) as runner:
        reference = runner.infer(feeds)
        with pytest.raises(InputSpecError, match="missing x; unexpected y"):
            runner.infer({"y": feeds["x"]})
    assert reference.taps["proj"].shape == (2, 8)
    np.testing.assert_allclose(ort_run(model, feeds)[names[0]], reference.outputs[names[0]], atol=1e-5)
    with OrtRunner(model, taps=["proj"]) as runner:
        np.testing.assert_allclose(runner.infer(feeds).taps["proj"], reference.taps["proj"], atol=1e-5)


def test_unknown_runtime_and_unavailable_ones_say_why(small):
    _, model, _ = small
    with pytest.raises(InputSpecError, match="unknown runtime 'tvm'"):
        make_runner("tvm", model)
    statuses = {s.name: s for s in runtime_statuses()}
    assert statuses["ort-cpu"].available and statuses["torch"].available
    cuda = torch.cuda.is_available()
    assert statuses["torch-cuda"].available == cuda
    tensorrt = importlib.util.find_spec("tensorrt") is not None
    assert statuses["trt"].available == (tensorrt and cuda)
    if not tensorrt:
        assert statuses["trt"].reason == "tensorrt is not installed (pip install 'ticknorm[trt]')"
        with pytest.raises(RuntimeUnavailable, match="tensorrt module is not installed"):
            make_runner("trt", model).check_available()
    with pytest.raises(InputSpecError, match="trt-fp16 builds a fp16 graph and this one is fp32: convert it first"):
        make_runner("trt-fp16", model)  # TensorRT takes its precision from the graph: no builder flag
    if not statuses["ort-cuda"].available:
        assert statuses["ort-cuda"].reason in ("no CUDA device", "this onnxruntime build has no CUDAExecutionProvider "
                                               "(pip install 'ticknorm[gpu]')")
        with pytest.raises(RuntimeUnavailable, match="ort-cuda"):
            make_runner("ort-cuda", model).check_available()


def test_trt_profile_and_cache_key_logic(small):
    _, model, feeds = small
    profile = optimization_profile({"ids": np.zeros((4, 128), np.int64), "pixels": np.zeros((1, 3, 8, 8))},
                                   {"ids": {0: "batch", 1: "seq"}})
    assert profile == {"ids": ((1, 1), (4, 128), (4, 128)), "pixels": ((1, 3, 8, 8),) * 3}
    digest = model_digest(model)
    base = engine_cache_key(digest, "10.9", "H100", TrtSettings(), profile)
    assert base == engine_cache_key(digest, "10.9", "H100", TrtSettings(), profile)
    variants = [engine_cache_key(digest, "10.10", "H100", TrtSettings(), profile),
                engine_cache_key(digest, "10.9", "A100", TrtSettings(), profile),
                engine_cache_key(digest, "10.9", "H100", TrtSettings(precision="fp16"), profile),
                engine_cache_key(digest, "11.4", "H100", TrtSettings(workspace_bytes=1 << 30), profile),
                engine_cache_key(digest, "10.9", "H100", TrtSettings(), {"ids": ((1, 1), (8, 128), (8, 128))}),
                engine_cache_key(digest, "10.9", "H100", TrtSettings(), profile, kernel_source_digest())]
    assert len({base, *variants}) == 7 and len(kernel_source_digest()) == 16
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    weight = changed.graph.initializer[0]
    weight.raw_data = (onnx.numpy_helper.to_array(weight) + 1).astype(np.float32).tobytes()
    assert model_digest(changed) != digest


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_trt_runner_matches_ort_on_a_gpu(small):
    if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
        pytest.skip("needs TensorRT and a CUDA GPU (neither is on this machine)")
    _, model, feeds = small
    name = model.graph.output[0].name
    with make_runner("trt", model, RunnerSetup(profile=optimization_profile(feeds, {"x": {0: "batch"}}))) as runner:
        result = runner.infer(feeds)
    np.testing.assert_allclose(result.outputs[name], ort_run(model, feeds)[name], atol=1e-4)


def _one_thread():
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return options


def _one_thread_status(name: str) -> RuntimeStatus:
    import onnxruntime

    return RuntimeStatus(name, onnxruntime.__version__, True)


def _one_thread_runner(request: RunnerRequest) -> OrtRunner:
    return OrtRunner(request.model, "cpu", request.setup.ort_optimization, session_options=_one_thread, taps=request.taps)


def test_a_runtime_added_as_one_row_of_the_table_is_known_to_every_command(small, tmp_path, monkeypatch):
    """A new kind of runtime is one `RuntimeKind` in `registry.KINDS` (here ONNX Runtime on one thread,
    a real session, timed by ONNX Runtime's collector; it reads no file itself, so the commands load
    the weights for it): `runtimes` lists it, `compare` judges it, `profile` times it, and a name
    nobody knows is refused with it among the choices."""
    from safetensors.torch import save_file

    module, model, _ = small
    onnx.save(model, tmp_path / "s.onnx")
    save_file(module.state_dict(), tmp_path / "s.safetensors")
    kind = RuntimeKind("ort-1thread", ("ort-1thread",), _one_thread_status, _one_thread_runner, "ort")
    monkeypatch.setattr(registry, "KINDS", (*registry.KINDS, kind))
    assert registry.runtime_patterns().endswith(", ort-1thread") and registry.needs_weights(["ort", "ort-1thread"])

    listed = CliRunner().invoke(main, ["runtimes"])
    assert listed.exit_code == 0 and listed.stdout.splitlines()[-1].split() == [
        "ort-1thread", _one_thread_status("").version, "available"]
    common = [tmp_path / "s.onnx", "--model", f"{FACTORIES}:small", "--checkpoint", tmp_path / "s.safetensors",
              "--input", "x:2x8:float32", "--runtime", "ort-1thread,ort"]
    compared = CliRunner().invoke(main, ["compare", *map(str, common)])
    assert compared.exit_code == 0, compared.output
    assert "ort-1thread vs torch (atol 0.0001, rtol 0.001):" in compared.stdout and compared.stdout.endswith("PASS\n")
    profiled = CliRunner().invoke(main, ["profile", *map(str, common), "--iterations", "2", "--warmup", "0"])
    assert profiled.exit_code == 0, profiled.output
    assert "ort-1thread ms" in profiled.stdout and "\nort-1thread: end-to-end " in profiled.stdout
    with pytest.raises(InputSpecError, match=r"unknown runtime 'tvm'; choose from: .*, trt-bf16, ort-1thread$"):
        make_runner("tvm", model)
