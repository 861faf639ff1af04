"""Ahead-of-time compilation of the LayerNorm kernel to PTX for a given GPU architecture, without
a GPU: what the TensorRT plugin's `aot_impl` hands TensorRT so an engine runs without Python.

Triton (3.3 and newer) appends hidden parameters to every kernel: a global-scratch and a
profile-scratch pointer. Whoever launches the PTX must pass them too; `AotKernel.hidden_params`
says how many, read from the PTX itself rather than assumed."""

import re
from dataclasses import dataclass

from ticknorm._optional import require
from ticknorm.plugins.launch import launch_config

TRITON_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
USER_PARAMS = ("X", "Y", "W", "B", "stride_x", "stride_y", "n_rows", "n_cols", "eps")


@dataclass
class AotKernel:
    ptx: str
    entry: str
    param_types: list  # PTX types of the entry's parameters, in order
    hidden_params: int  # parameters Triton added after the user's
    num_warps: int
    shared_bytes: int
    block_n: int
    rows: int
    arch: int


def compile_layer_norm(dtype: str, hidden: int, arch: int, has_weight: bool = True, has_bias: bool = True) -> AotKernel:
    triton = require("triton", "kernel")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ticknorm.plugins.ln_kernel import layer_norm_fwd

    pointer = "*" + TRITON_DTYPES[dtype]
    config = launch_config(1, hidden)
    signature = {"X": pointer, "Y": pointer, "W": pointer, "B": pointer, "stride_x": "i32", "stride_y": "i32",
                 "n_rows": "i32", "n_cols": "i32", "eps": "fp32", "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr",
                 "BLOCK_N": "constexpr", "ROWS": "constexpr"}
    constants = {"HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias, "BLOCK_N": config.block_n, "ROWS": config.rows}
    compiled = triton.compile(ASTSource(fn=layer_norm_fwd, signature=signature, constexprs=constants),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps})
    ptx = compiled.asm["ptx"]
    entry = re.search(r"\.visible \.entry (\w+)\(", ptx).group(1)
    header = ptx[ptx.index(".visible .entry"):]
    header = header[:header.index(")")]
    param_types = re.findall(r"\.param \.(\w+)", header)
    return AotKernel(ptx, entry, param_types, len(param_types) - len(USER_PARAMS), compiled.metadata.num_warps,
                     compiled.metadata.shared, config.block_n, config.rows, arch)
