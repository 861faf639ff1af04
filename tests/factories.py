"""Factories the tests load by `file.py:fn` reference, as users do."""

import torch
from torch import nn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.proj(x))


def small():
    return Small()


def not_a_module():
    return {"proj": 1}


def broken():
    raise RuntimeError("needs a GPU")


class NaNOutput(nn.Module):
    def forward(self, x):
        return torch.log(x - 100.0)


def nan_output():
    return NaNOutput()


class Histogram(nn.Module):
    """Calls an op no torch exporter can translate, inside a named submodule."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.stats = HistogramStats()

    def forward(self, x):
        return self.stats(self.proj(x))


class HistogramStats(nn.Module):
    def forward(self, x):
        return torch.histc(x, bins=4)


def histogram():
    return Histogram()


class Overflowing(nn.Module):
    """Activations around 1000 feed a hand-written LayerNorm: they fit fp16 (max 65504), their
    squares do not, so the variance overflows when the norm runs in fp16."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 16)
        self.norm = PowSqrtDivNorm()
        with torch.no_grad():
            self.proj.weight.mul_(4000.0)

    def forward(self, x):
        return self.norm(self.proj(x))


class PowSqrtDivNorm(nn.Module):
    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        return (x - u) / torch.sqrt((x - u).pow(2).mean(-1, keepdim=True) + 1e-5)


def overflowing():
    return Overflowing()


class Growing(nn.Module):
    """A norm whose input is scaled by `gain`, which a training loop multiplies by 4 each step
    (tests/test_ticks.py): what a diverging fine-tune does to a residual stream."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.gain = nn.Parameter(torch.ones(()), requires_grad=False)
        self.norm = nn.LayerNorm(7)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        return self.head(self.norm(self.gain * x))


def growing():
    return Growing()


class IgnoresMask(nn.Module):
    """Takes an argument it never reads: exporters drop it from the graph."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, mask):
        return self.proj(x)


def ignores_mask():
    return IgnoresMask()


class TorchEncoder(nn.Module):
    """PyTorch's own encoder layers, which take the `_native_multi_head_attention` fast path in
    eval under no_grad (as torchvision's ViT does)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.encoder(x))


def torch_encoder():
    return TorchEncoder()
