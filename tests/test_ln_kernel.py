"""The Triton LayerNorm kernel, run for real on the CPU by Triton's interpreter against an fp64
reference. TRITON_INTERPRET=1 must be set before triton is first imported, so this module sets it
(unless the caller chose otherwise); the tensors are CPU tensors either way."""

import os

import pytest

if not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported; harmless for the other tests

torch = pytest.importorskip("torch")
pytest.importorskip("triton", reason="the kernel extra (triton) is not installed")

from ticknorm.errors import InputSpecError  # noqa: E402
from ticknorm.plugins import layer_norm  # noqa: E402
from ticknorm.plugins.launch import launch_config, next_power_of_two  # noqa: E402

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def _reference(x, weight, bias, eps):
    w = weight.double() if weight is not None else None
    b = bias.double() if bias is not None else None
    return torch.nn.functional.layer_norm(x.double(), (x.shape[-1],), w, b, eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rows, hidden", [(1, 1), (3, 7), (17, 64), (5, 768), (4, 1000), (3, 2041), (2, 4096)])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_kernel_matches_fp64_within_dtype_tolerance(dtype, rows, hidden, affine):
    generator = torch.Generator().manual_seed(rows * 10_000 + hidden)
    # An offset mean far from zero: E[x^2] - E[x]^2 would lose the variance; two passes do not.
    x = (torch.randn(rows, hidden, generator=generator) * 2 + 30).to(dtype)
    weight = torch.randn(hidden, generator=generator).to(dtype) if affine != "none" else None
    bias = torch.randn(hidden, generator=generator).to(dtype) if affine == "both" else None
    eps = 1e-5 if hidden > 1 else 1e-3
    out = layer_norm(x, weight, bias, eps)
    assert out.dtype == dtype and out.shape == x.shape
    reference = _reference(x, weight, bias, eps)
    atol, rtol = TOLERANCES[dtype]
    error = (out.double() - reference).abs()
    assert bool((error <= atol + rtol * reference.abs()).all()), f"max error {error.max().item():.3g}"


def test_leading_dims_and_non_contiguous_rows():
    x = torch.randn(2, 3, 8, 10)[..., :8]  # last dim sliced: rows not contiguous
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
        k = compile_layer_norm(dtype, hidden, arch)
        rows.append(dict(arch=arch, dtype=dtype, hidden=hidden, entry=k.entry, types=k.param_types, hidden_params=k.hidden_params,
                         target=k.ptx.split(".target ")[1].split()[0], warps=k.num_warps, block=k.block_n))
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
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert {(r["arch"], r["target"]) for r in rows} == {(80, "sm_80"), (90, "sm_90a")}
    for row in rows:
        assert row["entry"] == "layer_norm_fwd"
        # X, Y, W, B pointers; strides, n_rows, n_cols; eps; then Triton's hidden scratch pointers
        assert row["types"][:9] == ["u64"] * 4 + ["u32"] * 4 + ["f32"]
        assert row["hidden_params"] == 2 and row["types"][9:] == ["u64", "u64"]
    assert {(r["hidden"], r["block"], r["warps"]) for r in rows} >= {(768, 1024, 4), (2041, 2048, 8), (8192, 8192, 16)}
