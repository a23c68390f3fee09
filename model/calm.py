"""CALM: a Transformer that predicts one continuous vector per chunk of K tokens (docs/model.md).

Step i of the backbone reads the previous chunk's K discrete tokens (embedded with the backbone's
table, concatenated, compressed by an MLP) and its hidden state conditions the energy head, which
maps uniform noise to a latent vector in one pass. The frozen autoencoder decodes that vector to
K tokens. Training minimises the energy score (alpha = 1) between N head samples and M samples of
the encoder's Gaussian for the true next chunk.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.autoencoder import Autoencoder
from model.backbone import Backbone
from model.config import CALMConfig
from model.layers import init_weights


def energy_loss(
    samples: torch.Tensor,
    mean: torch.Tensor,
    log_std: torch.Tensor,
    m_targets: int,
    generator: torch.Generator | None = None,
    target_scale: float = 1.0,
) -> torch.Tensor:
    """Negative energy score per position, alpha = 1.

    samples [P, N, D] from the model; targets y [P, M, D] drawn from
    N(mean, (target_scale * exp(log_std))^2) (constants: no gradient flows into mean and log_std;
    target_scale < 1 shrinks the posterior's noise, 0 leaves its mean):
        (2 / NM) sum_{n,m} |y_m - x_n| - (1 / (N(N-1))) sum_{n != k} |x_n - x_k|
    Only the [P, N, M] and [P, N, N] distance matrices exist: torch.cdist in its direct mode
    never builds the [P, N, M, D] difference tensor (forward or backward), and it is exact at
    zero distance (the diagonal of the sample-sample matrix), unlike the matmul expansion.
    """
    p, n, d = samples.shape
    if n < 2:
        raise ValueError("the energy score needs at least 2 model samples per position")
    with torch.no_grad():  # targets are constants (frozen encoder): one buffer, filled in place
        targets = torch.randn((p, m_targets, d), generator=generator, device=samples.device)
        targets.mul_(log_std.exp()[:, None] * target_scale).add_(mean[:, None])
    mode = "donot_use_mm_for_euclid_dist"
    to_targets = torch.cdist(samples, targets, compute_mode=mode).mean(dim=(1, 2))
    between = torch.cdist(samples, samples, compute_mode=mode).sum(dim=(1, 2))  # zero diagonal
    return 2 * to_targets - between / (n * (n - 1))


class HeadBlock(nn.Module):
    """Residual MLP block: x + down(SwiGLU(MLP(LayerNorm(x) || h)))."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(2 * d, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 2 * d)
        )
        self.down = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.mlp(torch.cat((self.norm(x), h), dim=-1)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class EnergyHead(nn.Module):
    """(hidden state, uniform noise) -> latent vector in a single forward pass."""

    def __init__(self, d: int, latent_dim: int, noise_dim: int, n_blocks: int):
        super().__init__()
        self.noise_in = nn.Sequential(nn.Linear(noise_dim, d), nn.LayerNorm(d, eps=1e-6))
        self.hidden_in = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d, eps=1e-6))
        self.blocks = nn.ModuleList(HeadBlock(d) for _ in range(n_blocks))
        self.out = nn.Sequential(
            nn.LayerNorm(d, eps=1e-6), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, latent_dim)
        )

    def forward(self, hidden: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """hidden [..., d], noise [..., S, noise_dim] -> S latent samples [..., S, latent_dim].

        The hidden-state projection is computed once per position and shared by its S samples.
        """
        x = self.noise_in(noise)
        h = self.hidden_in(hidden)[..., None, :].expand_as(x)
        for block in self.blocks:
            x = block(x, h)
        return self.out(x)


@dataclass
class CALMOutput:
    loss: torch.Tensor  # mean negative energy score over the scored chunks
    hidden: torch.Tensor  # [B, L-1, d] backbone states that predict chunks 1..L-1
    scored: torch.Tensor  # [B, L-1] bool: the chunks the loss scores


class CALM(nn.Module):
    def __init__(self, config: CALMConfig, autoencoder: Autoencoder | None = None):
        super().__init__()
        self.config = c = config
        d, k = c.backbone.d_model, c.k
        self.autoencoder = autoencoder if autoencoder is not None else Autoencoder(c.autoencoder)
        if self.autoencoder.config != c.autoencoder:
            raise ValueError("autoencoder config differs from config.autoencoder")
        self.autoencoder.requires_grad_(False)  # frozen after stage 1
        self.backbone = Backbone(c.backbone)
        self.compress = nn.Sequential(
            nn.Linear(k * d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d), nn.LayerNorm(d, eps=1e-6)
        )
        self.head = EnergyHead(d, c.autoencoder.latent_dim, c.noise_dim, c.head_layers)
        self.compress.apply(init_weights)
        self.head.apply(init_weights)
        nn.init.zeros_(self.head.out[-1].weight)  # the head starts by predicting the zero vector
        nn.init.zeros_(self.head.out[-1].bias)

    def train(self, mode: bool = True) -> "CALM":
        super().train(mode)
        self.autoencoder.eval()  # frozen: no token or latent dropout in the targets
        return self

    def embed_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks [B, T, K] token ids -> backbone inputs [B, T, d]."""
        return self.compress(self.backbone.wte(chunks).flatten(-2))

    def noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform noise in [-0.5, 0.5) of shape [*shape, noise_dim] (training draws)."""
        device = self.backbone.wte.weight.device
        return torch.rand((*shape, self.config.noise_dim), generator=generator, device=device) - 0.5

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [..., latent_dim] -> argmax tokens [..., K]."""
        return self.autoencoder.decode(latents).argmax(-1)

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        target_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> CALMOutput:
        """Energy loss on packed rows ids [B, L*K]: chunk i-1 predicts chunk i, i = 1..L-1.

        `targets` [B, L*K] (bool) marks the tokens to learn, e.g. a summary's and not its
        prompt's: a chunk with a target token is scored, the others are only read (as
        instruction-tuned models train on responses). None scores every chunk. `target_scale`
        shrinks the noise of the energy-loss targets (energy_loss).
        """
        c = self.config
        b, t = ids.shape
        if t % c.k or t // c.k < 2:
            raise ValueError(f"row length {t} must be a multiple of k={c.k} covering >= 2 chunks")
        chunks = ids.view(b, t // c.k, c.k)
        hidden, _ = self.backbone(self.embed_chunks(chunks[:, :-1]))
        if targets is None:
            scored = torch.ones(hidden.shape[:2], dtype=torch.bool, device=ids.device)
        else:
            scored = targets.view(b, t // c.k, c.k)[:, 1:].any(-1)
        with torch.no_grad():  # only the scored chunks are encoded and sampled for
            mean, log_std = self.autoencoder.encode(chunks[:, 1:][scored])  # [P, latent]
        samples = self.head(hidden[scored], self.noise((len(mean), c.n_samples), generator))
        if len(mean) == 0:  # nothing to learn in this batch: a zero that keeps the graph
            return CALMOutput(loss=samples.sum() * 0.0, hidden=hidden, scored=scored)
        loss = energy_loss(samples, mean, log_std, c.m_targets, generator, target_scale)
        return CALMOutput(loss=loss.mean(), hidden=hidden, scored=scored)
