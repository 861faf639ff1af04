"""The model `runtimes --check` proves a host with: small enough to export, convert and build on
every runtime in seconds, yet holding what a deployment's LayerNorm path holds (hand-written
LayerNorms the fusion must find, an nn.LayerNorm the exporter writes itself, residual adds that
move the mean away from zero, scales and biases that are not ones and zeros). Defined here, not
in examples/, so a pip-installed ticknorm can check a host with nothing else at hand.

Importing this module imports torch: `host_check` imports it only when a check runs."""

import numpy as np
import torch
from torch import nn

HIDDEN, BLOCKS, BATCH, SEQUENCE = 256, 3, 2, 16


class HandWrittenLayerNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        centered = x - mean
        variance = (centered * centered).mean(-1, keepdim=True)
        return centered / torch.sqrt(variance + self.eps) * self.weight + self.bias


class ProbeBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.feed_forward = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.norm = HandWrittenLayerNorm(hidden)

    def forward(self, x):
        return self.norm(x + self.feed_forward(x))


class LayerNormProbe(nn.Module):
    def __init__(self, hidden: int = HIDDEN, blocks: int = BLOCKS):
        super().__init__()
        self.blocks = nn.Sequential(*[ProbeBlock(hidden) for _ in range(blocks)])
        self.final_norm = nn.LayerNorm(hidden)

    def forward(self, x):
        return self.final_norm(self.blocks(x))


def build_probe() -> LayerNormProbe:
    """The same weights on every host (seeded without touching the caller's global RNG), with
    norm scales and biases moved off their identity values so a runtime that ignored them fails."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LayerNormProbe()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def probe_feeds(seed: int = 0) -> dict[str, np.ndarray]:
    """Activations with a mean of 3 and spread 2: a LayerNorm that skipped the centering, or took
    E[x^2] - E[x]^2 in low precision, shows."""
    x = np.random.default_rng(seed).standard_normal((BATCH, SEQUENCE, HIDDEN)) * 2 + 3
    return {"x": x.astype(np.float32)}
