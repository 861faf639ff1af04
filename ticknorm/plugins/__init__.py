"""ticknorm's own GPU LayerNorm: a Triton kernel, callable from PyTorch (and, on the CPU, under
TRITON_INTERPRET=1 — the same function and kernel source CI tests)."""

import dataclasses
import os

from ticknorm.base.optional import require
from ticknorm.base.errors import InputSpecError
from ticknorm.plugins.launch import LaunchConfig, launch_config

# The TensorRT plugin: ONNX nodes of this op type in this domain (with `plugin_namespace` and
# `plugin_version` attributes, which TensorRT's ONNX parser reads) become `ticknorm::LayerNorm`.
PLUGIN_NAMESPACE = "ticknorm"
PLUGIN_NAME = "LayerNorm"
PLUGIN_VERSION = "1"


def plugin_nodes(model) -> list[str]:
    """Names of the graph's plugin nodes: the graphs only TensorRT (with the plugin) can run."""
    return [node.name for node in model.graph.node if node.domain == PLUGIN_NAMESPACE and node.op_type == PLUGIN_NAME]


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5, config: LaunchConfig | None = None):
    """LayerNorm over the last dim of `x` (fp32/fp16/bf16), fp32 statistics, output in x's dtype.
    `config` replaces `launch_config`'s choice of block, rows per program and warps (its grid is
    recomputed): what benchmarks/ln_kernel.py --sweep tries."""
    torch = require("torch", "torch")
    require("triton", "kernel")
    from ticknorm.plugins.ln_kernel import layer_norm_fwd

    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputSpecError("ticknorm.plugins.layer_norm runs on CUDA tensors (or on the CPU with TRITON_INTERPRET=1)")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputSpecError(f"layer_norm takes float32, float16 or bfloat16, not {x.dtype}")
    hidden = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None and tuple(param.shape) != (hidden,):
            raise InputSpecError(f"{name} has shape {tuple(param.shape)}, expected ({hidden},)")
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty_like(rows)
    try:
        launch = launch_config(rows.shape[0], hidden)
    except ValueError as exc:
        raise InputSpecError(str(exc)) from exc
    if config is not None:
        launch = dataclasses.replace(config, grid=-(-rows.shape[0] // config.rows))
    if launch.grid:
        layer_norm_fwd[(launch.grid,)](
            rows, out, weight if weight is not None else rows, bias if bias is not None else rows,
            rows.stride(0), out.stride(0), rows.shape[0], hidden, eps,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_N=launch.block_n, ROWS=launch.rows,
            num_warps=launch.num_warps)
    return out.reshape(x.shape)
