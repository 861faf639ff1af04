"""One tensor's range, reduced on its own device to a few float64 numbers, so that a tick costs a
single host sync for every module together. Sums and counts rather than means and shares: a
module called twice in one forward (a shared norm) then adds up exactly."""

from ticknorm.base.precision import LARGEST, SMALLEST_NORMAL

# A reduced tensor, in this order: the sums first (added over calls), then the maxima (maxed).
SUMS = ("count", "nonzero", "sum", "sum_of_squares", "fp16_over", "fp16_under", "bf16_over", "bf16_under")
MAXIMA = ("absmax", "meansq_max")


def reduce_tensor(tensor):
    """The float64 vector SUMS + MAXIMA of `tensor`, still on its device; None when it is empty.
    Squares are taken in float32 (no float64 copy of an activation), summed in float64."""
    import torch

    if tensor.numel() == 0:
        return None
    x = tensor.detach().float()
    magnitude = x.abs()
    nonzero = magnitude > 0
    squares = x * x
    rows = squares.mean(-1) if x.ndim else squares  # a norm's mean of squares, per normalized row
    f64 = torch.float64
    parts = [torch.full((), x.numel(), dtype=f64, device=x.device), nonzero.sum(dtype=f64), x.sum(dtype=f64),
             squares.sum(dtype=f64)]
    for dtype in ("fp16", "bf16"):
        parts.append((magnitude > LARGEST[dtype]).sum(dtype=f64))
        parts.append((nonzero & (magnitude < SMALLEST_NORMAL[dtype])).sum(dtype=f64))
    parts += [magnitude.max().to(f64), rows.max().to(f64)]
    return torch.stack(parts)


def merge(first, second):
    """Two calls' vectors as one."""
    import torch

    split = len(SUMS)
    return torch.cat([first[:split] + second[:split], torch.maximum(first[split:], second[split:])])


def statistics(values: list[float], side: str) -> dict:
    """The recorded fields of one side ('input' or 'output') from a reduced vector: absmax, mean,
    variance, the largest per-row mean of squares (what a norm's variance reaches), the share of
    values past fp16's and bf16's largest number, and the share of nonzero values below their
    smallest normal (flushed or losing precision). bf16 has fp32's exponent range: on fp32
    training its shares count only infinities and fp32 subnormals."""
    reduced = dict(zip(SUMS + MAXIMA, values))
    count, nonzero = reduced["count"], max(reduced["nonzero"], 1.0)
    mean = reduced["sum"] / count
    variance = max(reduced["sum_of_squares"] / count - mean * mean, 0.0)
    fields = {"absmax": reduced["absmax"], "mean": mean, "var": variance, "meansq_max": reduced["meansq_max"]}
    for dtype in ("fp16", "bf16"):
        fields[f"{dtype}_overflow"] = reduced[f"{dtype}_over"] / count
        fields[f"{dtype}_underflow"] = reduced[f"{dtype}_under"] / nonzero
    return {f"{side}_{name}": value for name, value in fields.items()}
