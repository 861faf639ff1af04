"""The Triton LayerNorm forward kernel.

One program normalizes ROWS rows, each held whole in registers (BLOCK_N >= hidden, masked), in
fp32 whatever the input dtype: mean first, then the variance of the centered row (two passes over
registers, never E[x^2] - E[x]^2, which cancels catastrophically when |mean| >> std)."""

import triton
import triton.language as tl


@triton.jit
def layer_norm_fwd(X, Y, W, B, stride_x, stride_y, n_rows, n_cols, eps,
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
