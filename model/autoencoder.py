"""The CALM autoencoder: K tokens <-> one Gaussian latent vector (docs/model.md, "The autoencoder").

No attention. Encoder: embed K tokens -> per-position residual SwiGLU layers -> flatten and
squeeze (K*d -> d) -> chunk-level layers -> RMSNorm -> (mean, log-std). The decoder mirrors it
(latent -> d -> layers -> expand d -> K*d -> per-position layers -> RMSNorm) and its output
projection is the transposed input embedding table. Token dropout (ids -> <mask>), latent
dropout and a KL floored per dimension keep the latent space smooth, so that a slightly wrong
vector (what the energy head produces) still decodes to the right tokens.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import AutoencoderConfig
from model.layers import ResidualMLP, init_weights


@dataclass
class AutoencoderOutput:
    loss: torch.Tensor  # ce * K + kl_weight * kl
    ce: torch.Tensor  # mean token cross-entropy
    kl: torch.Tensor  # clamped KL summed over latent dims, mean over chunks
    logits: torch.Tensor  # [..., K, vocab]


class Autoencoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = c = config
        half = c.n_layers // 2
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        # encoder
        self.enc_token_layers = nn.ModuleList(ResidualMLP(c.d_model, c.d_ff) for _ in range(half))
        self.squeeze = nn.Linear(c.k * c.d_model, c.d_model)
        self.enc_chunk_layers = nn.ModuleList(ResidualMLP(c.d_model, c.d_ff) for _ in range(half))
        self.enc_norm = nn.RMSNorm(c.d_model, eps=1e-6)
        self.to_latent = nn.Linear(c.d_model, 2 * c.latent_dim)
        # decoder
        self.from_latent = nn.Linear(c.latent_dim, c.d_model)
        self.dec_chunk_layers = nn.ModuleList(ResidualMLP(c.d_model, c.d_ff) for _ in range(half))
        self.expand = nn.Linear(c.d_model, c.k * c.d_model)
        self.dec_token_layers = nn.ModuleList(ResidualMLP(c.d_model, c.d_ff) for _ in range(half))
        self.dec_norm = nn.RMSNorm(c.d_model, eps=1e-6)
        self.apply(init_weights)

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [..., K] -> (mean, log_std), each [..., latent_dim]."""
        if ids.shape[-1] != self.config.k:
            raise ValueError(
                f"expected chunks of k={self.config.k} ids, got shape {tuple(ids.shape)}"
            )
        x = self.wte(ids)  # [..., K, d]
        for layer in self.enc_token_layers:
            x = layer(x)
        x = self.squeeze(x.flatten(-2))  # [..., d]
        for layer in self.enc_chunk_layers:
            x = layer(x)
        mean, log_std = self.to_latent(self.enc_norm(x)).chunk(2, dim=-1)
        return mean, log_std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., latent_dim] -> logits [..., K, vocab]."""
        x = self.from_latent(z)
        for layer in self.dec_chunk_layers:
            x = layer(x)
        x = self.expand(x).unflatten(-1, (self.config.k, self.config.d_model))  # [..., K, d]
        for layer in self.dec_token_layers:
            x = layer(x)
        return F.linear(self.dec_norm(x), self.wte.weight)  # tied output projection

    def forward(self, ids: torch.Tensor) -> AutoencoderOutput:
        """Training loss on chunks ids [..., K]; dropouts act only in train mode."""
        c = self.config
        inputs = ids
        if self.training and c.token_dropout > 0:
            dropped = torch.rand(ids.shape, device=ids.device) < c.token_dropout
            inputs = ids.masked_fill(dropped, c.mask_id)
        mean, log_std = self.encode(inputs)
        std = log_std.exp()
        z = mean + std * torch.randn_like(mean)
        z = F.dropout(z, p=c.latent_dropout, training=self.training)
        logits = self.decode(z)
        ce = F.cross_entropy(logits.flatten(0, -2).float(), ids.flatten())
        kl = 0.5 * (mean.square() + std.square() - 1 - 2 * log_std)
        kl = kl.clamp(min=c.kl_clamp).sum(-1).mean()
        return AutoencoderOutput(loss=ce * c.k + c.kl_weight * kl, ce=ce, kl=kl, logits=logits)

    @torch.no_grad()
    def reconstruct(
        self, ids: torch.Tensor, sigma: float = 0.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """argmax-decode the encoder mean, optionally perturbed by N(0, sigma^2) noise."""
        mean, _ = self.encode(ids)
        if sigma > 0:
            mean = mean + sigma * torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.decode(mean).argmax(-1)


@torch.no_grad()
def reconstruction_accuracy(
    model: Autoencoder,
    chunks: torch.Tensor,
    sigma: float = 0.0,
    batch_size: int = 4096,
    seed: int = 0,
) -> float:
    """Fraction of tokens in chunks [n, K] recovered exactly (latent noise sigma, fixed seed)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=chunks.device).manual_seed(seed)
    correct = sum(
        (model.reconstruct(part, sigma, generator) == part).sum().item()
        for part in chunks.split(batch_size)
    )
    model.train(was_training)
    return correct / chunks.numel()
