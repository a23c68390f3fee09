"""What the training job measures at each evaluation, per model kind.

- every model: the loss on fixed held-out batches (seeded, so numbers compare across steps);
- autoencoder: token reconstruction accuracy on held-out chunks, clean and with Gaussian noise
  on the latent (the robustness CALM relies on);
- CALM and AR: BrierLM on held-out documents (model/evaluate.py; the same two-sample estimator
  for both, plus the AR baseline's lower-variance Rao-Blackwell form), and on the domain corpus
  the fact accuracy of summaries generated from held-out prompts (operators/facts.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from model.ar import ARModel
from model.autoencoder import Autoencoder, reconstruction_accuracy
from model.brierlm import N_MAX
from model.calm import CALM
from model.config import ARConfig, AutoencoderConfig, CALMConfig
from model.data import Batch
from model.evaluate import evaluate_model
from model.generate import generate
from model.tokenizer import Tokenizer
from model.train_loops import evaluate_loss, model_inputs
from operators.facts import score
from pipeline.training.corpus import ChunkSamples, DocumentRows, RowSamples, TokenCorpus
from pipeline.training.stages import EvalSpec

LOSS_BATCHES = 4


def heldout_batches(
    samples: ChunkSamples | RowSamples | DocumentRows, batch_size: int
) -> list[Batch]:
    """Up to LOSS_BATCHES fixed batches spread evenly over the held-out split."""
    count = min(LOSS_BATCHES * batch_size, len(samples))
    if count == 0:
        return []
    indices = np.linspace(0, len(samples) - 1, count).astype(np.int64)
    return [
        samples.batch(part, epoch=0)
        for part in np.array_split(indices, max(1, count // batch_size))
    ]


def brier_context(config: AutoencoderConfig | CALMConfig | ARConfig, row_len: int) -> int:
    """Context tokens BrierLM conditions on: a training row, less room for the 4-token rollout."""
    if isinstance(config, AutoencoderConfig):
        return row_len
    rollout_steps = -(-N_MAX // config.k)
    return min(row_len, (config.backbone.max_seq_len - rollout_steps + 1) * config.k)


def autoencoder_metrics(model: Autoencoder, split: TokenCorpus, spec: EvalSpec) -> dict[str, float]:
    k = model.config.k
    n = min(spec.recon_chunks, len(split.stream) // k)
    chunks = torch.from_numpy(split.stream[: n * k].reshape(n, k).astype(np.int64))
    return {
        "recon_acc": reconstruction_accuracy(model, chunks),
        f"recon_acc_sigma{spec.noise_sigma:g}": reconstruction_accuracy(
            model, chunks, sigma=spec.noise_sigma
        ),
    }


def brier_metrics(
    model: CALM | ARModel, split: TokenCorpus, spec: EvalSpec, context_tokens: int, seed: int
) -> dict[str, float]:
    documents = [split.document(i) for i in range(split.documents)]
    report = evaluate_model(
        model,
        documents,
        context_tokens,
        max_positions=spec.brier_positions,
        batch_size=spec.brier_batch,
        seed=seed,
    )
    two_sample = report.estimators["two_sample"]
    metrics = {
        "brier_lm": two_sample.brier_lm,
        "brier_lm_stderr": two_sample.brier_lm_stderr,
        **{f"brier_{n + 1}": float(b) for n, b in enumerate(two_sample.brier)},
    }
    if "rao_blackwell" in report.estimators:
        metrics["brier_lm_rb"] = report.estimators["rao_blackwell"].brier_lm
        metrics["brier_lm_rb_stderr"] = report.estimators["rao_blackwell"].brier_lm_stderr
    return metrics


def digit_ids(tokenizer: Tokenizer) -> np.ndarray:
    """The ids of the tokenizer's single-digit tokens (numbers are split into digits)."""
    return np.array([i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]).isdigit()])


@torch.no_grad()
def summary_metrics(
    model: CALM | ARModel,
    split: TokenCorpus,
    row_len: int,
    batch_size: int,
    digits: np.ndarray,
    seed: int,
) -> dict[str, float]:
    """What tells whether a model learns to copy, whatever rows it trains on: the loss on the
    summaries' tokens only, and (CALM) teacher-forced chunk accuracy: one head sample per summary
    chunk, decoded by the autoencoder, equal to the true chunk (all K tokens), over all summary
    chunks and over those holding a digit (the numbers the summary copies from its prompt)."""
    rows = DocumentRows(split, row_len, model.config.k, summary_only=True)
    batches = heldout_batches(rows, batch_size)
    if not batches:
        return {}
    metrics = {"summary_loss": evaluate_loss(model, batches, seed=seed)}
    if not isinstance(model, CALM):
        return metrics
    hits, digit_hits = [], []
    device = next(model.parameters()).device
    digits_t = torch.from_numpy(digits).to(device)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for ids, targets in batches:
            ids_t, targets_t = model_inputs((ids, targets), device)
            out = model(ids_t, targets_t)
            truth = ids_t.view(len(ids), -1, model.config.k)[:, 1:][out.scored]
            hidden = out.hidden[out.scored]
            latent = model.head(hidden, model.noise((len(hidden), 1)))[:, 0]
            hit = (model.decode_latents(latent) == truth).all(-1)
            hits.append(hit)
            digit_hits.append(hit[torch.isin(truth, digits_t).any(-1)])
    hits_all, digit_all = torch.cat(hits).float(), torch.cat(digit_hits).float()
    metrics["chunk_acc"] = hits_all.mean().item()
    metrics["digit_chunk_acc"] = digit_all.mean().item() if len(digit_all) else float("nan")
    return metrics


def fact_metrics(
    model: CALM | ARModel, tokenizer: Tokenizer, split: TokenCorpus, spec: EvalSpec, seed: int
) -> dict[str, float | str]:
    """Generate summaries for the first `fact_prompts` held-out prompts and score their facts."""
    n = min(spec.fact_prompts, len(split.prompts))
    if n == 0 or not split.facts:
        return {}
    out = generate(
        model,
        [p.tolist() for p in split.prompts[:n]],
        spec.max_new_tokens,
        seeds=[seed + i for i in range(n)],
        temperature=spec.temperature,
        sampler=spec.sampler,
    )
    texts = [tokenizer.decode(tokens).strip() for tokens in out.tokens]
    scores = [score(text, facts) for text, facts in zip(texts, split.facts[:n])]
    return {
        "fact_accuracy": float(np.mean([s.accuracy for s in scores])),
        "fact_precision": float(np.mean([s.precision for s in scores])),
        "fact_recall": float(np.mean([s.recall for s in scores])),
        "fact_exact": float(np.mean([s.accuracy == 1.0 for s in scores])),
        "ended_on_eos": float(np.mean([r == "eos" for r in out.finish_reasons])),
        "draws_per_step": float(np.sum(out.draws) / max(1, np.sum(out.steps))),
        "example": texts[0],
    }


def evaluate(
    model: nn.Module,
    samples: ChunkSamples | RowSamples | DocumentRows,
    split: TokenCorpus,
    spec: EvalSpec,
    tokenizer: Tokenizer,
    context_tokens: int,
    batch_size: int,
    seed: int,
    with_facts: bool,
) -> dict[str, float | str]:
    """All metrics of one held-out split for `model` (an unwrapped module on the CPU)."""
    metrics: dict[str, float | str] = {}
    batches = heldout_batches(samples, batch_size)
    if batches:
        metrics["loss"] = evaluate_loss(model, batches, seed=seed)
    if isinstance(model, Autoencoder):
        metrics |= autoencoder_metrics(model, split, spec)
    else:
        metrics |= brier_metrics(model, split, spec, context_tokens, seed)
        if with_facts:
            row_len = samples.tokens_per_sample()
            metrics |= summary_metrics(
                model, split, row_len, batch_size, digit_ids(tokenizer), seed
            )
            metrics |= fact_metrics(model, tokenizer, split, spec, seed)
    model.train()
    return metrics
