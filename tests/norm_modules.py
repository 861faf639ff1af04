"""Real PyTorch modules that write LayerNorm and RMSNorm the ways real models do, and modules
that only look like them. Shared by the fusion tests and the benchmarks."""

import torch
from torch import nn

EPS = 1e-5


class Affine(nn.Module):
    def __init__(self, shape=(16,), scale=True, bias=True):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(shape)) if scale else None
        self.bias = nn.Parameter(0.1 * torch.randn(shape)) if bias else None

    def affine(self, y, scale_first=True):
        if self.weight is not None:
            y = self.weight * y if scale_first else y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def pow_sqrt_div(x, eps=EPS):
    """BERT's TF port and many hand-written LayerNorms, without the affine part."""
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return (x - u) / torch.sqrt(s + eps)


class PowSqrtDiv(Affine):
    def forward(self, x):
        return self.affine(pow_sqrt_div(x))


class MulRsqrt(Affine):
    def forward(self, x):
        d = x - x.mean(-1, keepdim=True)
        return self.affine(d * torch.rsqrt((d * d).mean(-1, keepdim=True) + EPS), scale_first=False)


class VarMean(Affine):
    def forward(self, x):
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
        return self.affine((x - mean) * torch.rsqrt(var + EPS))


class ReciprocalSqrt(Affine):
    def forward(self, x):
        d = x - x.mean(-1, keepdim=True)
        return self.affine(d * (1.0 / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + EPS)))


class TwoTrailingAxes(Affine):
    def __init__(self):
        super().__init__(shape=(4, 16))

    def forward(self, x):
        u = x.mean((-2, -1), keepdim=True)
        s = (x - u).pow(2).mean((-2, -1), keepdim=True)
        return self.affine((x - u) / torch.sqrt(s + EPS))


class ChannelsFirst(nn.Module):
    """ConvNeXt's LayerNorm over the channels of an NCHW tensor."""

    def __init__(self, channels=8):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(channels))
        self.bias = nn.Parameter(0.1 * torch.randn(channels))

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + EPS)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class HalfIsland(Affine):
    """fp16 model whose LayerNorm computes in fp32 between two Casts (many mixed-precision ports)."""

    def forward(self, x):
        return self.affine(pow_sqrt_div(x.float()).to(x.dtype))


class T5RMSNorm(nn.Module):
    def __init__(self, hidden=16):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(hidden))

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + 1e-6)
        return self.weight * x.to(self.weight.dtype)


# Look-alikes: each must be refused (or only partly absorbed), never fused wrongly.


class AxesDiffer(nn.Module):
    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-2, keepdim=True)
        return (x - u) / torch.sqrt(s + EPS)


class EpsOutsideSqrt(nn.Module):
    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return (x - u) / (torch.sqrt(s) + EPS)


class UnbiasedVariance(nn.Module):
    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = x.var(-1, keepdim=True, unbiased=True)
        return (x - u) / torch.sqrt(s + EPS)


class EpsInput(nn.Module):
    def forward(self, x, eps):
        return pow_sqrt_div(x, eps)


class CenteredAlsoReturned(nn.Module):
    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        d = x - u
        return d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + EPS), d


class CenteredReusedInside(nn.Module):
    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        d = x - u
        return d / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + EPS) + 0.5 * d


class InputScale(nn.Module):
    """adaLN-style: the scale is an input of the normalized dims, which the fused node reads."""

    def forward(self, x, gamma):
        return pow_sqrt_div(x) * gamma


class PerTokenScale(nn.Module):
    """A constant that varies along the sequence axis is no per-feature LayerNorm scale."""

    def __init__(self):
        super().__init__()
        self.register_buffer("token_scale", torch.linspace(0.5, 1.5, 6)[:, None])

    def forward(self, x):
        return pow_sqrt_div(x) * self.token_scale


class IslandThenShift(nn.Module):
    """An fp32 model that rounds to fp16 around its LayerNorm and goes on in fp32 (`x.half().float()`,
    output cast back): one fp16 step flipped by the fusion stays one step after the shift."""

    def __init__(self, hidden=16):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        return pow_sqrt_div(self.proj(x).half().float()).half().float() - 2.0
