"""`ticknorm::LayerNorm` for TensorRT, registered with `tensorrt.plugin` (quickly deployable
plugins) with an ahead-of-time implementation: at build time TensorRT asks `aot_impl` for the
kernel's PTX, launch grid and extra arguments and stores them in the engine, so the engine runs
without Python (trtexec too, given the plugin library that TensorRT ships for AOT plugins).

The kernel is `layer_norm_plugin`, compiled by `ticknorm.plugins.aot` for the GPU TensorRT builds
on; eps is compiled into it because an AOT plugin's extra arguments are int32 only. Its rows are
the input flattened at `axis` (ONNX LayerNormalization's meaning): the normalized dims must be
build-time constants (they size the kernel), the leading ones may be dynamic (they size the grid).

NOT VERIFIED on TensorRT: no machine this project runs on has it. The arithmetic below
(`split_at_axis`, `kernel_dtype`, `launch_grid`) is plain Python and unit-tested, and the PTX is
compiled and its parameter list checked in CI. tests/test_ln_kernel.py launches the PTX the way
TensorRT does, but only on a CUDA GPU, which no run has had yet. The `tensorrt.plugin` calls
follow NVIDIA's samples for TensorRT 10.9+."""

import functools
import hashlib
import math
import operator
from pathlib import Path
from typing import List, Tuple, Union

from ticknorm.base.errors import RuntimeUnavailable, TicknormError
from ticknorm.plugins import PLUGIN_NAME, PLUGIN_NAMESPACE
from ticknorm.plugins.aot import AotKernel, compile_layer_norm, driver_ptx_version

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
KERNEL_DTYPES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16"}  # trt.DataType name -> Triton dtype
# Index-wise: X, scale, bias and the output share one dtype, picked from these.
TYPE_COMBINATION = ", ".join(["FP32|FP16|BF16"] * 4)

_registered = False


def kernel_dtype(trt_dtype) -> str:
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    if name not in KERNEL_DTYPES:
        raise TicknormError(f"{PLUGIN_ID} takes float32, float16 or bfloat16 tensors, not {name}")
    return KERNEL_DTYPES[name]


def split_at_axis(dims: list, axis: int) -> tuple[list, list]:
    """(leading dims, normalized dims) of an input of these dims, for LayerNormalization's `axis`."""
    rank = len(dims)
    if not -rank <= axis < rank:
        raise TicknormError(f"{PLUGIN_ID}: axis {axis} is out of range for a rank-{rank} input")
    start = axis % rank
    return list(dims[:start]), list(dims[start:])


def product(values: list, one=1):
    """The product of ints or TensorRT shape expressions (which only multiply on the left)."""
    return functools.reduce(operator.mul, values[1:], values[0]) if values else one


def launch_grid(n_rows, rows_per_program: int, ceil_div):
    """Programs for `n_rows` rows: plain arithmetic for a build-time constant, else TensorRT's
    symbolic `ceil_div` so the engine computes it per shape."""
    if isinstance(n_rows, int):
        return -(-n_rows // rows_per_program)
    return n_rows if rows_per_program == 1 else ceil_div(n_rows, rows_per_program)


def kernel_source_digest() -> str:
    """A hash of what decides the plugin's PTX: the kernel, its launch choices, its compiler call
    (read as files: importing the kernel would import triton)."""
    digest = hashlib.sha256()
    for name in ("ln_kernel.py", "launch.py", "aot.py"):
        digest.update(Path(__file__).with_name(name).read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def kernel_for_this_gpu(dtype: str, hidden: int, eps: float) -> AotKernel:
    """The PTX for the GPU TensorRT builds on, at an ISA the installed driver loads."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return compile_layer_norm(dtype, hidden, major * 10 + minor, eps, driver_ptx_version())


def register_plugin() -> None:
    """Register `ticknorm::LayerNorm` with TensorRT's plugin registry, once per process; the ONNX
    parser then finds it for the nodes `--ln-target plugin` writes."""
    global _registered
    if _registered:
        return
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise RuntimeUnavailable(f"trt: tensorrt.plugin cannot be imported ({exc}); the {PLUGIN_ID} plugin needs "
                                 "TensorRT 10.9 or newer") from exc
    if not hasattr(trtp, "aot_impl"):
        raise RuntimeUnavailable(f"trt: this TensorRT has no ahead-of-time plugins; {PLUGIN_ID} needs 10.9 or newer")
    _define(trtp)
    _registered = True


def _define(trtp) -> None:
    @trtp.register(PLUGIN_ID)
    def describe(x: trtp.TensorDesc, scale: trtp.TensorDesc, bias: trtp.TensorDesc, epsilon: float,
                 axis: int) -> trtp.TensorDesc:
        return x.like()

    @trtp.autotune(PLUGIN_ID)
    def formats(x: trtp.TensorDesc, scale: trtp.TensorDesc, bias: trtp.TensorDesc, epsilon: float, axis: int,
                outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(TYPE_COMBINATION, "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def ahead_of_time(x: trtp.TensorDesc, scale: trtp.TensorDesc, bias: trtp.TensorDesc, epsilon: float, axis: int,
                      outputs: Tuple[trtp.TensorDesc], tactic: int
                      ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        leading, normalized = split_at_axis(list(x.shape_expr), axis)
        if not all(dim.is_constant for dim in normalized):
            raise ValueError(f"{PLUGIN_ID}: the normalized dims must be static (they size the kernel)")
        hidden = math.prod(dim.constant_value() for dim in normalized)
        kernel = kernel_for_this_gpu(kernel_dtype(x.dtype), hidden, float(epsilon))
        n_rows = product(leading)
        launch = trtp.KernelLaunchParams()
        launch.grid_x = launch_grid(n_rows, kernel.rows, trtp.cdiv)
        launch.block_x = kernel.threads
        launch.shared_mem = kernel.shared_bytes
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(n_rows), trtp.SymInt32(hidden)])
        return kernel.entry, kernel.ptx, launch, extra
