"""The Triton LayerNorm forward kernel.

One program normalizes ROWS rows, each held whole in registers (BLOCK_N >= hidden, masked), in
fp32 whatever the input dtype: mean first, then the variance of the centered row (two passes over
registers, never E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std).

Two entry points share that body because their callers disagree on the argument list:
- `layer_norm_fwd` is PyTorch's: row strides, eps at run time, optional weight and bias;
- `layer_norm_plugin` is TensorRT's. An ahead-of-time plugin kernel is launched with the plugin's
  input pointers, then its extra int32 arguments, then its output pointers, and nothing else: so
  the order is X, W, B, n_rows, n_cols, Y; rows are contiguous (TensorRT's linear format); and eps,
  a float TensorRT cannot pass, is compiled in as a constant."""

import triton
import triton.language as tl


@triton.jit
def _normalize_rows(X, Y, W, B, stride_x, stride_y, n_rows, n_cols, eps,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    centered = tl.where(mask, x - mean[:, None], 0.0)
    variance = tl.sum(centered * centered, axis=1) / n_cols
    y = centered * (1.0 / tl.sqrt(variance + eps))[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=1.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def layer_norm_fwd(X, Y, W, B, stride_x, stride_y, n_rows, n_cols, eps,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    _normalize_rows(X, Y, W, B, stride_x, stride_y, n_rows, n_cols, eps, HAS_WEIGHT, HAS_BIAS, BLOCK_N, ROWS)


@triton.jit
def layer_norm_plugin(X, W, B, n_rows, n_cols, Y,
                      EPS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    _normalize_rows(X, Y, W, B, n_cols, n_cols, n_rows, n_cols, EPS, True, True, BLOCK_N, ROWS)
