"""Encoders for the benchmarks: BERT-shaped, with LayerNorms written by hand (as in BERT's TF port
and many fine-tuned checkpoints), so the exported graphs hold decomposed LayerNorms."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from norm_modules import MulRsqrt, PowSqrtDiv  # noqa: E402, F401 - re-exported for the benchmarks


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x):
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / (hidden // self.heads) ** 0.5, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, seq, hidden))


class Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, norm: type):
        super().__init__()
        self.attention = Attention(hidden, heads)
        self.attention_norm = norm(shape=(hidden,))
        self.feed_forward = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.output_norm = norm(shape=(hidden,))

    def forward(self, x):
        x = self.attention_norm(x + self.attention(x))
        return self.output_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, layers: int = 12, hidden: int = 768, heads: int = 12, vocab: int = 30522, norm: type = PowSqrtDiv):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, hidden)
        self.embedding_norm = norm(shape=(hidden,))
        self.layers = nn.ModuleList([Layer(hidden, heads, norm) for _ in range(layers)])

    def forward(self, input_ids):
        x = self.embedding_norm(self.embeddings(input_ids))
        for layer in self.layers:
            x = layer(x)
        return x


def bert_base() -> Encoder:
    torch.manual_seed(0)
    return Encoder().eval()
