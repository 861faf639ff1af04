"""The Triton LayerNorm kernel against an fp64 reference: compiled on a CUDA GPU where there is
one, else run for real on the CPU by Triton's interpreter (TRITON_INTERPRET=1, which must be set
before triton is first imported, so this module sets it). On a GPU the PTX TensorRT would get is
also launched the way TensorRT launches it."""

import os

import pytest

torch = pytest.importorskip("torch")
ON_GPU = torch.cuda.is_available()
if not ON_GPU and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported; harmless for the other tests
DEVICE = "cuda" if ON_GPU else "cpu"
pytest.importorskip("triton", reason="the kernel extra (triton) is not installed")

from ticknorm.base.errors import InputSpecError  # noqa: E402
from ticknorm.plugins import layer_norm  # noqa: E402
from ticknorm.plugins.aot import compile_layer_norm, driver_ptx_version  # noqa: E402
from ticknorm.plugins.launch import launch_config, next_power_of_two  # noqa: E402

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def _reference(x, weight, bias, eps):
    w = weight.double().cpu() if weight is not None else None
    b = bias.double().cpu() if bias is not None else None
    return torch.nn.functional.layer_norm(x.double().cpu(), (x.shape[-1],), w, b, eps)


def _assert_within(out, reference, dtype, what="kernel"):
    atol, rtol = TOLERANCES[dtype]
    error = (out.double().cpu() - reference).abs()
    assert bool((error <= atol + rtol * reference.abs()).all()), f"{what}: max error {error.max().item():.3g}"


def _case(rows, hidden, dtype, affine="both"):
    generator = torch.Generator().manual_seed(rows * 10_000 + hidden)
    # An offset mean far from zero: E[x^2] - E[x]^2 would lose the variance; two passes do not.
    x = (torch.randn(rows, hidden, generator=generator) * 2 + 30).to(dtype)
    weight = torch.randn(hidden, generator=generator).to(dtype) if affine != "none" else None
    bias = torch.randn(hidden, generator=generator).to(dtype) if affine == "both" else None
    return [t.to(DEVICE) if t is not None else None for t in (x, weight, bias)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rows, hidden", [(1, 1), (3, 7), (17, 64), (5, 768), (4, 1000), (3, 2041), (2, 4096)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_kernel_matches_fp64_within_dtype_tolerance(dtype, rows, hidden, affine):
    x, weight, bias = _case(rows, hidden, dtype, affine)
    eps = 1e-5 if hidden > 1 else 1e-3
    out = layer_norm(x, weight, bias, eps)
    assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
    reference = _reference(x, weight, bias, eps)
    _assert_within(out, reference, dtype)
    if ON_GPU:  # PyTorch's own CUDA kernel meets the same bar on the same inputs
        _assert_within(torch.nn.functional.layer_norm(x, (hidden,), weight, bias, eps), reference, dtype, "F.layer_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rows, hidden", [(3, 7), (5, 768), (3, 2041)])
def test_plugin_entry_point_matches_fp64(dtype, rows, hidden):
    """`layer_norm_plugin`, TensorRT's argument order with eps compiled in, on the same body."""
    from ticknorm.plugins.ln_kernel import layer_norm_plugin

    x, weight, bias = _case(rows, hidden, dtype)
    out = torch.empty_like(x)
    config = launch_config(rows, hidden)
    layer_norm_plugin[(config.grid,)](x, weight, bias, rows, hidden, out, EPS=1e-5, BLOCK_N=config.block_n,
                                      ROWS=config.rows, num_warps=config.num_warps)
    _assert_within(out, _reference(x, weight, bias, 1e-5), dtype)


def test_leading_dims_and_non_contiguous_rows():
    x = torch.randn(2, 3, 8, 10, device=DEVICE)[..., :8]  # last dim sliced: rows not contiguous
    out = layer_norm(x, eps=1e-5)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (8,), eps=1e-5), atol=1e-5, rtol=1e-5)


def test_launch_config():
    assert next_power_of_two(1000) == 1024 and next_power_of_two(2041) == 2048 and next_power_of_two(1) == 1
    small = launch_config(16384, 768)
    assert (small.block_n, small.rows, small.grid) == (1024, 4, 4096)
    large = launch_config(16384, 8192)
    assert (large.block_n, large.rows, large.num_warps, large.grid) == (8192, 1, 16, 16384)
    assert launch_config(5, 7).rows == 16 and launch_config(5, 7).grid == 1
    with pytest.raises(ValueError, match="exceeds"):
        launch_config(1, 70000)


def test_bad_inputs_are_clear():
    with pytest.raises(InputSpecError, match="not torch.int64"):
        layer_norm(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(InputSpecError, match=r"weight has shape \(3,\), expected \(4,\)"):
        layer_norm(torch.ones(2, 4), torch.ones(3))


AOT_PROBE = """
import json, sys
from ticknorm.plugins.aot import compile_layer_norm
rows = []
for arch in (80, 90):
    for dtype, hidden in (("fp16", 768), ("bf16", 2041), ("fp32", 8192)):
        k = compile_layer_norm(dtype, hidden, arch, 1e-5)
        rows.append(dict(arch=arch, dtype=dtype, hidden=hidden, entry=k.entry, types=k.param_types, hidden_params=k.hidden_params,
                         target=k.ptx.split(".target ")[1].split()[0], warps=k.num_warps, block=k.block_n,
                         eps_constant="0f3727C5AC" in k.ptx))
lowered = compile_layer_norm("fp16", 768, 80, 1e-5, max_ptx_version=80)
rows.append(dict(lowered=lowered.ptx.split(".version ")[1].split()[0]))
print(json.dumps(rows))
"""


def test_ahead_of_time_ptx_for_sm80_and_sm90_without_a_gpu():
    """Compiled in a child process: this module runs Triton in interpreter mode, which cannot compile."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", AOT_PROBE], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    *rows, lowered = json.loads(done.stdout.strip().splitlines()[-1])
    assert {(r["arch"], r["target"]) for r in rows} == {(80, "sm_80"), (90, "sm_90a")}
    for row in rows:
        assert row["entry"] == "layer_norm_plugin" and row["eps_constant"]  # eps 1e-5 compiled in
        # What TensorRT passes (X, W, B, n_rows, n_cols, Y), then Triton's hidden scratch pointers,
        # which TensorRT passes as null
        assert row["types"][:6] == ["u64"] * 3 + ["u32"] * 2 + ["u64"]
        assert row["hidden_params"] == 2 and row["types"][6:] == ["u64", "u64"]
    assert lowered == {"lowered": "8.0"}  # an older driver's ISA on request
    assert {(r["hidden"], r["block"], r["warps"]) for r in rows} >= {(768, 1024, 4), (2041, 2048, 8), (8192, 8192, 16)}


def _launch_with_ticknorm(kernel, pointers: tuple, rows: int) -> None:
    from ticknorm.plugins.ptx_launch import LoadedPtx

    with LoadedPtx(kernel) as loaded:
        loaded.launch(pointers, rows, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()


def _launch_with_cupy(kernel, pointers: tuple, rows: int) -> None:
    """An independent launcher: when ticknorm's and this one disagree, the launcher is at fault, not the PTX."""
    cupy = pytest.importorskip("cupy", reason="the cross-check launches the PTX with cupy too")
    import numpy as np

    module = cupy.cuda.function.Module()
    module.load(kernel.ptx.encode())
    function = module.get_function(kernel.entry)
    x, weight, bias, out = (np.uint64(p) for p in pointers)
    args = (x, weight, bias, np.int32(rows), np.int32(kernel.hidden), out) + (np.uint64(0),) * kernel.hidden_params
    torch.cuda.synchronize()
    function((kernel.grid(rows), 1, 1), (kernel.threads, 1, 1), args, shared_mem=kernel.shared_bytes)
    cupy.cuda.Device().synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [_launch_with_ticknorm, _launch_with_cupy], ids=["libcuda", "cupy"])
@pytest.mark.parametrize("dtype, rows, hidden", [("fp16", 1000, 768), ("bf16", 37, 2041), ("fp32", 5, 8192)])
def test_aot_ptx_launched_the_way_tensorrt_launches_it(dtype, rows, hidden, launch):
    """The PTX loaded by the driver and launched with exactly TensorRT's arguments: input pointers,
    int32 extra arguments, output pointer, null for every further parameter."""
    if not ON_GPU:
        pytest.skip("needs a CUDA GPU (none on this machine); CI checks the PTX's parameter list instead")
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    x, weight, bias = _case(rows, hidden, torch_dtype)
    out = torch.full_like(x, float("nan"))
    major, minor = torch.cuda.get_device_capability()
    kernel = compile_layer_norm(dtype, hidden, major * 10 + minor, 1e-5, driver_ptx_version())
    launch(kernel, tuple(t.data_ptr() for t in (x, weight, bias, out)), rows)
    _assert_within(out, _reference(x, weight, bias, 1e-5), torch_dtype)


def _aot_kernel(hidden_params: int = 2):
    from ticknorm.plugins.aot import AotKernel

    ptx = ".version 8.7\n.target sm_90a\n"
    types = ("u64",) * 3 + ("u32",) * 2 + ("u64",) + ("u64",) * hidden_params
    return AotKernel(ptx, "layer_norm_plugin", types, hidden_params, 4, 16, 1024, 4, 90, "fp16", 768, 1e-5)


def test_ptx_arguments_are_tensorrts_in_the_ptx_types():
    """What cuLaunchKernel reads: three 8-byte pointers, two 4-byte ints, the output, then null."""
    import ctypes
    import dataclasses

    from ticknorm.base.errors import RuntimeFailure
    from ticknorm.plugins.ptx_launch import kernel_arguments

    arguments = kernel_arguments(_aot_kernel(), (11, 12, 13, 14), 1000)
    assert [type(a) for a in arguments] == [ctypes.c_uint64] * 3 + [ctypes.c_uint32] * 2 + [ctypes.c_uint64] * 3
    assert [a.value for a in arguments] == [11, 12, 13, 1000, 768, 14, 0, 0]
    broken = dataclasses.replace(_aot_kernel(), param_types=_aot_kernel().param_types[:-1])
    with pytest.raises(RuntimeFailure, match="takes 7 parameters; TensorRT passes X, W, B, n_rows, n_cols, Y and 2 null"):
        kernel_arguments(broken, (11, 12, 13, 14), 1000)


class _OldDriver:
    """libcuda as a driver too old for the PTX answers: a context is current, the load is refused."""

    def cuInit(self, flags):
        return 0

    def cuCtxGetCurrent(self, context):
        context._obj.value = 1
        return 0

    def cuModuleLoadData(self, module, image):
        return 222

    def cuGetErrorName(self, result, text):
        text._obj.value = b"CUDA_ERROR_UNSUPPORTED_PTX_VERSION"
        return 0


class _RecordingDriver(_OldDriver):
    """A driver that loads anything and records the launch, as cuLaunchKernel would read it."""

    def __init__(self):
        self.launches, self.unloaded = [], 0

    def cuModuleLoadData(self, module, image):
        module._obj.value = 7
        return 0

    def cuModuleGetFunction(self, function, module, name):
        function._obj.value = 8
        return 0

    def cuFuncSetAttribute(self, function, attribute, value):
        return 0

    def cuLaunchKernel(self, function, *arguments):
        import ctypes

        *dims, shared, stream, params, extra = arguments
        widths = [ctypes.c_uint64] * 3 + [ctypes.c_uint32] * 2 + [ctypes.c_uint64] * 3
        read = [ctypes.cast(params[i], ctypes.POINTER(width)).contents.value for i, width in enumerate(widths)]
        self.launches.append((function.value, dims, shared, stream, read, extra))
        return 0

    def cuModuleUnload(self, module):
        self.unloaded += 1
        return 0


def test_the_ptx_launch_passes_tensorrts_arguments_by_address(monkeypatch):
    from ticknorm.plugins import ptx_launch

    driver = _RecordingDriver()
    monkeypatch.setattr(ptx_launch, "cuda_driver", lambda: driver)
    with ptx_launch.LoadedPtx(_aot_kernel()) as loaded:
        loaded.launch((11, 12, 13, 14), 1001, stream=99)
    # grid ceil(1001 / 4 rows per program), 4 warps of 32 threads, the kernel's shared bytes, the caller's stream
    assert driver.launches == [(8, [251, 1, 1, 128, 1, 1], 16, 99, [11, 12, 13, 1001, 768, 14, 0, 0], None)]
    assert driver.unloaded == 1


def test_a_driver_older_than_the_ptx_isa_is_one_line_naming_it(monkeypatch):
    from ticknorm.base.errors import RuntimeUnavailable
    from ticknorm.plugins import ptx_launch

    monkeypatch.setattr(ptx_launch, "cuda_driver", _OldDriver)
    monkeypatch.setattr(ptx_launch, "driver_version", lambda: "12.2")
    with pytest.raises(RuntimeUnavailable) as raised:
        with ptx_launch.LoadedPtx(_aot_kernel()):
            pass
    assert str(raised.value) == ("the CUDA driver 12.2 cannot load PTX ISA 8.7 for sm_90 (CUDA_ERROR_UNSUPPORTED_PTX_VERSION: "
                                 "unsupported PTX version); a newer driver is missing")


def test_benchmark_script_runs_end_to_end_through_the_interpreter(tmp_path):
    """benchmarks/ln_kernel.py's own smoke mode: the GPU figures come from it, so CI runs it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ln_kernel.py"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--rows", "8", "--hidden", "64,1000",
                           "--dtypes", "fp16", "--iterations", "1", "--sweep", "--json", str(tmp_path / "b.json"),
                           "--plot", str(tmp_path / "b.png")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "timings meaningless" in done.stdout and "goals met at" in done.stdout
    written = json.loads((tmp_path / "b.json").read_text())
    assert [r["hidden"] for r in written["results"]] == [64, 1000]
    assert all(r["err_ours"] < 1e-2 for r in written["results"])  # the kernel's fp16 output, checked again
    assert [s["hidden"] for s in written["sweeps"]] == [64, 1000] and (tmp_path / "b.png").stat().st_size > 0
