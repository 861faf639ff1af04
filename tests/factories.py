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
