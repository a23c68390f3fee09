"""BrierLM for CALM and the AR baseline through model/brierlm.py's model-agnostic driver.

Both models plug in with a sampler (two independent continuations per position, by
model/generate.py at T = 1, EOS counted as a token); CALM with K < 4 rolls out ceil(4/K) steps,
with K >= 4 it takes the first tokens of its next chunk. The AR baseline also gives exact n-gram
probabilities, so the driver adds the lower-variance probability forms.

Long prefixes are cut to the last `context_tokens` tokens behind a fresh <bos>: the shape of the
training rows (<bos> + a stream window), so the model never reads a context it was not trained on.
"""

from collections.abc import Sequence

import numpy as np
import torch

from model.ar import ARModel
from model.brierlm import BrierReport, evaluate_brier
from model.calm import CALM
from model.generate import generate, pad_prompts
from model.tokenizer import BOS_ID


def clip_context(prefix: np.ndarray, context_tokens: int) -> list[int]:
    """prefix, or <bos> + its last context_tokens - 1 tokens when longer."""
    if len(prefix) <= context_tokens:
        return prefix.tolist()
    return [BOS_ID, *prefix[len(prefix) - context_tokens + 1 :].tolist()]


def row_seeds(seed: int, rows: int) -> list[int]:
    """Independent per-row seeds derived from one batch seed."""
    return np.random.SeedSequence(seed).generate_state(rows).tolist()


def model_sampler(model: CALM | ARModel, context_tokens: int):
    """`sample(prefixes, n_tokens, seed) -> [B, n_tokens]` for the BrierLM driver."""

    def sample(prefixes: list[np.ndarray], n_tokens: int, seed: int) -> np.ndarray:
        prompts = [clip_context(p, context_tokens) for p in prefixes]
        out = generate(model, prompts, n_tokens, row_seeds(seed, len(prompts)), stop_on_eos=False)
        return np.array(out.tokens, dtype=np.int64)

    return sample


def ar_probability(model: ARModel, context_tokens: int):
    """`probability(prefixes, continuations) -> [B, n]` cumulative n-gram probabilities."""

    @torch.no_grad()
    def probability(prefixes: list[np.ndarray], continuations: np.ndarray) -> np.ndarray:
        model.eval()
        n = continuations.shape[1]
        # the last continuation token is only predicted, never read: context + n - 1 positions,
        # the same as generating the n tokens (so any context the sampler fits in, fits here)
        rows = [
            clip_context(p, context_tokens) + c[:-1].tolist()
            for p, c in zip(prefixes, continuations)
        ]
        device = model.lm_head.weight.device
        ids, mask = pad_prompts(rows, 1)  # left-padded: every continuation ends the row
        hidden, _ = model.backbone(
            model.embed_chunks(ids.to(device)), attention_mask=mask.to(device)
        )
        logp = torch.log_softmax(model.lm_head(hidden[:, -n:]).float(), dim=-1)
        index = torch.as_tensor(continuations, device=device)[..., None]
        return logp.gather(-1, index)[..., 0].cumsum(-1).exp().cpu().numpy()

    return probability


def evaluate_model(
    model: CALM | ARModel,
    documents: Sequence[np.ndarray],
    context_tokens: int,
    max_positions: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> BrierReport:
    """Brier-1..4 and BrierLM of `model` on token documents (each starting with <bos>)."""
    return evaluate_brier(
        documents,
        model.config.k,
        model_sampler(model, context_tokens),
        ar_probability(model, context_tokens) if isinstance(model, ARModel) else None,
        batch_size=batch_size,
        max_positions=max_positions,
        seed=seed,
    )
