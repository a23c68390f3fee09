"""Building blocks shared by the autoencoder and the Transformer backbone."""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Llama's gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class ResidualMLP(nn.Module):
    """Pre-norm residual SwiGLU layer: x + mlp(rmsnorm(x)) (the autoencoder's only layer type)."""

    def __init__(self, d_model: int, d_ff: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=eps)
        self.mlp = SwiGLU(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Llama-style init for `module.apply`: normal(0, std) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
