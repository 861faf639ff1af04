"""Ahead-of-time compilation of the plugin's LayerNorm kernel to PTX for a given GPU architecture,
without a GPU: what the TensorRT plugin's `aot_impl` hands TensorRT so an engine runs without Python.

TensorRT launches the PTX with exactly the plugin's input pointers, its int32 extra arguments and
its output pointers (`PLUGIN_PARAMS`), and pads any further parameter with null. Triton (3.3 and
newer) appends hidden parameters to every kernel, a global-scratch and a profile-scratch pointer;
null is what Triton's own launcher passes when the kernel asked for no scratch, so the PTX is
usable only when both scratch sizes are zero, which `compile_layer_norm` checks rather than
assumes. The hidden parameters are counted from the PTX itself."""

import re
from dataclasses import dataclass

from ticknorm.base.optional import require
from ticknorm.base.errors import KernelAbiError
from ticknorm.plugins.launch import launch_config

TRITON_DTYPES = ("fp32", "fp16", "bf16")
PLUGIN_PARAMS = ("X", "W", "B", "n_rows", "n_cols", "Y")  # inputs, int32 extra arguments, output


@dataclass(frozen=True)
class AotKernel:
    ptx: str
    entry: str
    param_types: tuple[str, ...]  # PTX types of the entry's parameters, in order
    hidden_params: int  # parameters Triton added after PLUGIN_PARAMS (TensorRT passes null)
    num_warps: int
    shared_bytes: int
    block_n: int
    rows: int  # rows per program: the grid is ceil(n_rows / rows)
    arch: int
    dtype: str
    hidden: int
    eps: float

    @property
    def threads(self) -> int:
        return self.num_warps * 32

    def grid(self, n_rows: int) -> int:
        return -(-n_rows // self.rows)


def compile_layer_norm(dtype: str, hidden: int, arch: int, eps: float, max_ptx_version: int | None = None) -> AotKernel:
    """PTX of `layer_norm_plugin` for rows of `hidden` `dtype` elements on sm_`arch`.

    Triton writes PTX of the ISA its bundled ptxas knows, which a deploying driver older than that
    ptxas cannot load; `max_ptx_version` (e.g. 90 for PTX 9.0, see `driver_ptx_version`) recompiles
    at that ISA when Triton's is newer."""
    triton = require("triton", "kernel")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ticknorm.plugins.ln_kernel import layer_norm_plugin

    if dtype not in TRITON_DTYPES:
        raise KernelAbiError(f"the LayerNorm plugin kernel takes {', '.join(TRITON_DTYPES)}, not {dtype}")
    try:
        config = launch_config(1, hidden)
    except ValueError as exc:
        raise KernelAbiError(str(exc)) from exc
    pointer = "*" + dtype
    signature = {"X": pointer, "W": pointer, "B": pointer, "n_rows": "i32", "n_cols": "i32", "Y": pointer,
                 "EPS": "constexpr", "BLOCK_N": "constexpr", "ROWS": "constexpr"}
    constants = {"EPS": float(eps), "BLOCK_N": config.block_n, "ROWS": config.rows}
    source = ASTSource(fn=layer_norm_plugin, signature=signature, constexprs=constants)
    target = GPUTarget("cuda", arch, 32)
    compiled = triton.compile(source, target=target, options={"num_warps": config.num_warps})
    if max_ptx_version is not None and ptx_isa(compiled.asm["ptx"]) > max_ptx_version:
        compiled = triton.compile(source, target=target,
                                  options={"num_warps": config.num_warps, "ptx_version": max_ptx_version})
    metadata = compiled.metadata
    for scratch in ("global_scratch_size", "profile_scratch_size"):
        if getattr(metadata, scratch, 0):
            raise KernelAbiError(f"the compiled kernel needs {getattr(metadata, scratch)} bytes of Triton "
                                 f"{scratch.replace('_size', '')}, which a TensorRT launch cannot provide")
    ptx = compiled.asm["ptx"]
    entry, param_types = ptx_entry(ptx)
    if param_types[:len(PLUGIN_PARAMS)] != ("u64",) * 3 + ("u32",) * 2 + ("u64",):
        raise KernelAbiError(f"unexpected parameter list {param_types} for {entry}; TensorRT passes "
                             f"{', '.join(PLUGIN_PARAMS)}")
    return AotKernel(ptx, entry, param_types, len(param_types) - len(PLUGIN_PARAMS), metadata.num_warps,
                     metadata.shared, config.block_n, config.rows, arch, dtype, hidden, float(eps))


def ptx_entry(ptx: str) -> tuple[str, tuple]:
    """The kernel's entry name and the PTX types of its parameters, in order."""
    found = re.search(r"\.visible \.entry (\w+)\(([^)]*)\)", ptx)
    if found is None:
        raise KernelAbiError("no kernel entry in the PTX")
    return found.group(1), tuple(re.findall(r"\.param \.(\w+)", found.group(2)))


def ptx_isa(ptx: str) -> int:
    """The PTX ISA a module declares, as Triton counts it: `.version 8.7` is 87."""
    found = re.search(r"^\.version (\d+)\.(\d+)", ptx, re.MULTILINE)
    if found is None:
        raise KernelAbiError("the PTX declares no .version")
    return int(found.group(1)) * 10 + int(found.group(2))


def driver_version() -> str | None:
    """The installed CUDA driver's version as CUDA counts it ("13.0"), or None where no driver is
    installed: what decides the newest PTX ISA it loads."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def driver_ptx_version() -> int | None:
    """The newest PTX ISA the installed CUDA driver can load (Triton's own table), or None
    where no driver is installed."""
    from triton.backends.nvidia.compiler import ptx_get_version

    version = driver_version()
    return None if version is None else ptx_get_version(version)
