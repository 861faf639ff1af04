"""A small transformer encoder that writes its LayerNorms the ways real models do.

Block 0 normalizes like BERT's TF port (mean, pow, sqrt, div), block 1 like models that use
var_mean and rsqrt, the final norm with nn.LayerNorm. `build` is the factory ticknorm calls:
`ticknorm export examples/tiny_transformer.py:build --checkpoint examples/tiny_transformer.safetensors ...`
"""

import torch
from torch import nn

VOCAB, HIDDEN, HEADS, LAYERS = 1000, 64, 4, 2


class PowSqrtLayerNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        variance = (x - mean).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - mean) / torch.sqrt(variance + self.eps)) + self.bias


class VarMeanLayerNorm(PowSqrtLayerNorm):
    def forward(self, x):
        variance, mean = torch.var_mean(x, dim=-1, keepdim=True, unbiased=False)
        return (x - mean) * torch.rsqrt(variance + self.eps) * self.weight + self.bias


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, HEADS, HIDDEN // HEADS).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / (HIDDEN // HEADS) ** 0.5, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, seq, HIDDEN))


class Block(nn.Module):
    def __init__(self, norm: type):
        super().__init__()
        self.attention = SelfAttention()
        self.attention_norm = norm(HIDDEN)
        self.feed_forward = nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN))
        self.output_norm = norm(HIDDEN)

    def forward(self, x):
        x = self.attention_norm(x + self.attention(x))
        return self.output_norm(x + self.feed_forward(x))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position = nn.Parameter(torch.zeros(1, 128, HIDDEN))
        self.layers = nn.ModuleList([Block(PowSqrtLayerNorm), Block(VarMeanLayerNorm)])
        self.final_norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, input_ids):
        x = self.embeddings(input_ids) + self.position[:, : input_ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.final_norm(x)[:, 0])


def build() -> TinyTransformer:
    return TinyTransformer()


if __name__ == "__main__":
    # Stands in for fine-tuning: seeded, non-trivial weights, saved the way a trainer would.
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm.bias") or name == "position":
                parameter.add_(0.1 * torch.randn_like(parameter))
    save_file(model.state_dict(), "examples/tiny_transformer.safetensors")
