"""The GPU half of `runtimes --check`: ticknorm's own LayerNorm on this host's GPU. The Triton
kernel, compiled here, is judged against fp64 over a few shapes (with F.layer_norm's error and time
beside it), and the PTX `compile_layer_norm` writes for TensorRT is loaded by this host's driver
and launched with TensorRT's arguments, judged against the JIT kernel: the engine's LayerNorm,
proven without TensorRT. Each needs torch with a CUDA device and triton with a CUDA backend; a
host without them gets rows that say which is missing."""

import functools
import importlib.metadata
from dataclasses import replace

from ticknorm.base.errors import RuntimeUnavailable, first_line
from ticknorm.base.metrics import Tolerance, compare_arrays
from ticknorm.base.optional import require
from ticknorm.base.precision import TYPE_NAMES
from ticknorm.runtime.torch_runner import to_numpy
from ticknorm.validate.check_rows import FAIL, PASS, CheckRow, caught, median_ms

EPS = 1e-5
KERNEL_DTYPES = ("fp32", "fp16", "bf16")
# (rows, hidden): one row, a hidden that is no power of two, and a large shape that is also timed.
KERNEL_SHAPES = ((1, 768), (37, 1000), (4096, 4096))
# (dtype, rows, hidden): a ragged grid, a partial last program, the widest block.
PTX_CASES = (("fp16", 1000, 768), ("bf16", 37, 2041), ("fp32", 5, 8192))


def kernel_rows(iterations: int, gpu: str | None, progress=lambda message: None) -> list:
    version = _version("triton")
    rows = []
    for dtype in KERNEL_DTYPES:
        progress(f"checking the Triton LayerNorm kernel in {dtype}")
        row = CheckRow(f"triton layer_norm {dtype}", version, gpu or "-")
        rows.append(caught(row, functools.partial(_kernel_row, row, dtype, iterations)))
    for case in PTX_CASES:
        progress(f"loading and launching the plugin's PTX ({case[0]}, {case[1]}x{case[2]})")
        row = CheckRow(f"plugin ptx {case[0]} {case[1]}x{case[2]}", version, gpu or "-")
        rows.append(caught(row, functools.partial(_ptx_row, row, case, iterations)))
    return rows


def cuda_triton():
    """torch, once torch sees a CUDA device and triton has a working CUDA backend; else the
    missing piece, named."""
    torch = require("torch", "torch")
    if not torch.cuda.is_available():
        raise RuntimeUnavailable(f"no CUDA device visible to torch {torch.__version__}")
    triton = require("triton", "kernel")
    try:
        backend = triton.runtime.driver.active.get_current_target().backend
    except Exception as exc:  # noqa: BLE001 - triton raises untyped errors when no backend loads
        raise RuntimeUnavailable(f"triton {triton.__version__} has no working GPU backend ({first_line(exc)})") from exc
    if backend != "cuda":
        raise RuntimeUnavailable(f"triton {triton.__version__} runs on its {backend} backend here, not CUDA")
    return torch


def _kernel_row(row: CheckRow, dtype: str, iterations: int) -> CheckRow:
    torch = cuda_triton()
    from ticknorm.plugins import layer_norm

    tolerance = Tolerance().at(TYPE_NAMES[dtype])
    ours, theirs = [], []
    for rows, hidden in KERNEL_SHAPES:
        x, weight, bias = _case(torch, rows, hidden, dtype)
        reference = to_numpy(torch.nn.functional.layer_norm(x.double(), (hidden,), weight.double(), bias.double(), EPS))
        name = f"{rows}x{hidden}"
        ours.append(compare_arrays(name, reference, to_numpy(layer_norm(x, weight, bias, EPS)), tolerance.atol,
                                   tolerance.rtol))
        torchs = to_numpy(torch.nn.functional.layer_norm(x, (hidden,), weight, bias, EPS))
        theirs.append(compare_arrays(name, reference, torchs, tolerance.atol, tolerance.rtol))
    # timed on the last, largest shape
    ours_ms = median_ms(_synchronized(torch, lambda: layer_norm(x, weight, bias, EPS)), iterations)
    torch_ms = median_ms(_synchronized(torch, lambda: torch.nn.functional.layer_norm(x, (hidden,), weight, bias, EPS)),
                         iterations)
    failed = next((check for check in ours if not check.passed), None)
    note = (f"vs fp64 over {len(ours)} shapes; F.layer_norm: max error {max(c.max_abs for c in theirs):.2g}, "
            f"{torch_ms:.3f} ms at {rows}x{hidden}, ours {torch_ms / ours_ms:.2f}x as fast")
    return replace(row, verdict=FAIL if failed else PASS, max_error=max(c.max_abs for c in ours),
                   tolerance=(tolerance.atol, tolerance.rtol), median_ms=ours_ms,
                   note=f"{failed.name}: {failed.reason}; {note}" if failed else note)


def _ptx_row(row: CheckRow, case: tuple, iterations: int) -> CheckRow:
    torch = cuda_triton()
    from ticknorm.plugins import layer_norm
    from ticknorm.plugins.aot import compile_layer_norm, driver_ptx_version, driver_version, ptx_isa
    from ticknorm.plugins.ptx_launch import LoadedPtx

    dtype, rows, hidden = case
    loadable = driver_ptx_version()
    if loadable is None:
        raise RuntimeUnavailable("no CUDA driver library (libcuda.so.1) to load the PTX with")
    major, minor = torch.cuda.get_device_capability()
    kernel = compile_layer_norm(dtype, hidden, major * 10 + minor, EPS, loadable)
    x, weight, bias = _case(torch, rows, hidden, dtype)
    out = torch.full_like(x, float("nan"))
    pointers = tuple(t.data_ptr() for t in (x, weight, bias, out))
    stream = torch.cuda.current_stream().cuda_stream
    with LoadedPtx(kernel) as loaded:
        launch = _synchronized(torch, lambda: loaded.launch(pointers, rows, stream))
        launch()
        launched = to_numpy(out)
        launch_ms = median_ms(launch, iterations)
    tolerance = Tolerance().at(TYPE_NAMES[dtype])
    check = compare_arrays(f"{rows}x{hidden}", to_numpy(layer_norm(x, weight, bias, EPS)), launched, tolerance.atol,
                           tolerance.rtol)
    isa = ptx_isa(kernel.ptx)
    note = (f"PTX ISA {isa // 10}.{isa % 10} for sm_{kernel.arch}, loaded by CUDA driver {driver_version()}; "
            "vs the JIT kernel")
    return replace(row, verdict=PASS if check.passed else FAIL, max_error=check.max_abs,
                   tolerance=(tolerance.atol, tolerance.rtol), median_ms=launch_ms,
                   note=note if check.passed else f"{check.reason}; {note}")


def _case(torch, rows: int, hidden: int, dtype: str) -> tuple:
    """x with its mean far from zero (30, spread 2: one-pass statistics would lose the variance),
    and a scale and bias that are not ones and zeros; seeded, made on the CPU, moved to the GPU."""
    generator = torch.Generator().manual_seed(rows * 10_000 + hidden)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    x = torch.randn(rows, hidden, generator=generator) * 2 + 30
    weight, bias = torch.randn(hidden, generator=generator), torch.randn(hidden, generator=generator)
    return tuple(t.to(torch_dtype).cuda() for t in (x, weight, bias))


def _synchronized(torch, call):
    def run():
        call()
        torch.cuda.synchronize()
    return run


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"
