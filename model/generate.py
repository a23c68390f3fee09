"""Batched generation with the KV cache for CALM and the discrete AR baseline.

One loop serves both models; each generative step emits a chunk of k tokens (CALM: K, AR: 1).
model/engine.py runs the same loop on onnxruntime; with the same seeds both give the same tokens.

- Ragged prompts: each prompt (token ids as the model reads them, normally starting with <bos>)
  is left-padded with <pad> to a multiple of k (model.chunking.left_pad_to_multiple: the
  padding CALM saw in training), then the batch is left-padded with whole pad chunks that the
  attention mask hides; position ids start at each row's first real chunk.
- Stopping: a row ends at its first <eos> (not emitted) or at its token limit; the last chunk is
  truncated, so a row never overshoots. Finished rows leave the batch.
- Seeds: every row owns a numpy generator, np.random.default_rng(seed), that supplies its head
  noise (CALM), its sampling uniforms (AR) and every uniform of the temperature samplers, so a
  row's output depends on its prompt and seed only: not on its batch-mates, the batch order or
  the KV cache.
- Temperature: AR samples softmax(logits / T) (T = 0: argmax). CALM has no likelihood and uses
  the likelihood-free samplers of model/sampling.py through their `draw(rows) -> chunks`
  interface; T = 1 is one plain draw.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from model import chunking, sampling
from model.ar import ARModel
from model.calm import CALM
from model.tokenizer import EOS_ID, PAD_ID

SamplerName = Literal["adaptive", "exact", "approximate"]


@dataclass
class Generation:
    tokens: list[list[int]]  # per row, without the prompt and without <eos>
    finish_reasons: list[str]  # "eos" or "length"
    steps: list[int]  # generative steps per row
    draws: list[int]  # chunks drawn from the model per row (CALM temperature sampling cost)


def pad_prompts(prompts: Sequence[Sequence[int]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunks [B, n, k], chunk mask [B, n]) as tensors: model.chunking.pad_prompts."""
    chunks, mask = chunking.pad_prompts(prompts, k, PAD_ID)
    return torch.from_numpy(chunks), torch.from_numpy(mask)


def ar_next_tokens(
    model: ARModel, hidden: torch.Tensor, rngs: list[np.random.Generator], temperature: float
) -> tuple[torch.Tensor, np.ndarray]:
    """One token per row from softmax(logits / T), by inverse CDF on the row's own uniform."""
    logits = model.lm_head(hidden).float()
    ones = np.ones(len(rngs), dtype=np.int64)
    if temperature == 0.0:
        return logits.argmax(-1)[:, None], ones
    z = logits / temperature
    cdf = (z - z.max(-1, keepdim=True).values).exp().cumsum(-1)
    u = torch.tensor([g.random(dtype=np.float32) for g in rngs], device=cdf.device)
    token = (cdf <= (u * cdf[:, -1])[:, None]).sum(-1).clamp(max=cdf.shape[-1] - 1)
    return token[:, None], ones


def calm_next_chunks(
    model: CALM,
    hidden: torch.Tensor,
    rngs: list[np.random.Generator],
    temperature: float,
    sampler: SamplerName = "adaptive",
    n_candidates: int = 200,
) -> tuple[torch.Tensor, np.ndarray]:
    """One K-token chunk per row: energy head sample(s) -> decoder -> argmax (-> temperature)."""
    noise_dim = model.config.noise_dim

    def draw(rows: np.ndarray) -> np.ndarray:
        noise = np.empty((rows.size, 1, noise_dim), dtype=np.float32)
        for r in np.unique(rows):  # each row's noise from its own generator, in draw order
            at = np.flatnonzero(rows == r)
            noise[at, 0] = rngs[r].random((at.size, noise_dim), dtype=np.float32)
        noise -= 0.5  # uniform in [-0.5, 0.5), as CALM.noise
        index = torch.from_numpy(rows).to(hidden.device)
        latents = model.head(hidden[index], torch.from_numpy(noise).to(hidden.device))[:, 0]
        return model.decode_latents(latents).cpu().numpy()

    b = len(rngs)
    if temperature == 1.0:
        chunks, draws = draw(np.arange(b)), np.ones(b, dtype=np.int64)
    elif sampler == "approximate":
        pool = draw(np.repeat(np.arange(b), n_candidates)).reshape(b, n_candidates, -1)
        chunks = sampling.approximate_temperature_sample(pool, temperature, rngs)
        draws = np.full(b, n_candidates, dtype=np.int64)
    elif sampler == "exact":
        chunks, draws, _ = sampling.exact_temperature_sample(draw, b, temperature, rngs)
    elif sampler == "adaptive":
        chunks, draws, _ = sampling.adaptive_temperature_sample(
            draw, b, temperature, rngs, max_draws=n_candidates
        )
    else:
        raise ValueError(f"unknown sampler {sampler!r}")
    return torch.from_numpy(chunks), draws


def check_request(
    model: CALM | ARModel, limits: np.ndarray, seeds: list[int], temperature: float
) -> None:
    if len(seeds) != len(limits):
        raise ValueError(f"{len(seeds)} seeds for {len(limits)} prompts")
    if (limits < 0).any():
        raise ValueError("max_new_tokens must be >= 0")
    if isinstance(model, ARModel) and not 0.0 <= temperature <= 1.0:
        raise ValueError(f"temperature must be in [0, 1] for AR (0 = greedy), got {temperature}")
    if isinstance(model, CALM) and not 0.0 < temperature <= 1.0:
        raise ValueError(f"temperature must be in (0, 1] for CALM, got {temperature}")


@torch.no_grad()
def generate(
    model: CALM | ARModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    seeds: Sequence[int] | None = None,
    temperature: float = 1.0,
    stop_on_eos: bool = True,
    use_cache: bool = True,
    sampler: SamplerName = "adaptive",
    n_candidates: int = 200,
) -> Generation:
    """Continue every prompt by up to its `max_new_tokens` tokens (see the module docstring).

    Seeds default to 0..B-1; `n_candidates` is the approximate rule's pool (and the adaptive
    sampler's cap); `use_cache=False` recomputes the whole sequence each step (for testing).
    """
    b, k = len(prompts), model.config.k
    limits = np.broadcast_to(np.asarray(max_new_tokens, dtype=np.int64), (b,)).copy()
    seeds = list(range(b)) if seeds is None else list(seeds)
    check_request(model, limits, seeds, temperature)
    chunks, mask = pad_prompts(prompts, k)
    if chunks.shape[1] + -(-limits.max() // k) - 1 > model.config.backbone.max_seq_len:
        raise ValueError(
            f"prompt of {chunks.shape[1]} positions + {limits.max()} new tokens exceeds "
            f"max_seq_len={model.config.backbone.max_seq_len} positions"
        )
    model.eval()
    device = next(model.parameters()).device
    rngs = [np.random.default_rng(int(s)) for s in seeds]
    out: list[list[int]] = [[] for _ in range(b)]
    reasons, steps, draws = ["length"] * b, [0] * b, [0] * b
    alive = np.flatnonzero(limits > 0)  # original indices of the rows still generating
    if alive.size == 0:
        return Generation(out, reasons, steps, draws)
    chunks, mask = chunks[alive].to(device), mask[alive].to(device)
    hidden, cache = model.backbone(model.embed_chunks(chunks), attention_mask=mask)
    while True:
        alive_rngs = [rngs[i] for i in alive]
        if isinstance(model, CALM):
            new, cost = calm_next_chunks(
                model, hidden[:, -1], alive_rngs, temperature, sampler, n_candidates
            )
        else:
            new, cost = ar_next_tokens(model, hidden[:, -1], alive_rngs, temperature)
        keep = np.ones(alive.size, dtype=bool)
        for j, i in enumerate(alive):
            tokens, ended = chunking.accept_chunk(
                new[j].tolist(), limits[i] - len(out[i]), EOS_ID, stop_on_eos
            )
            if ended:
                reasons[i], keep[j] = "eos", False
            out[i] += tokens
            steps[i] += 1
            draws[i] += int(cost[j])
            keep[j] &= len(out[i]) < limits[i]
        if not keep.any():
            return Generation(out, reasons, steps, draws)
        rows = torch.from_numpy(np.flatnonzero(keep)).to(device)
        alive, new = alive[keep], new.to(device)[rows]
        chunks = torch.cat((chunks[rows], new[:, None]), dim=1)
        mask = torch.cat((mask[rows], mask.new_ones(alive.size, 1)), dim=1)
        if use_cache:
            cache = [(key[rows], value[rows]) for key, value in cache]
            hidden, cache = model.backbone(
                model.embed_chunks(new[:, None]), attention_mask=mask, past_key_values=cache
            )
        else:
            hidden, _ = model.backbone(model.embed_chunks(chunks), attention_mask=mask)
