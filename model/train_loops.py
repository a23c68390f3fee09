"""Plain single-process training for the autoencoder, CALM (autoencoder frozen) and the AR baseline.

Every model's forward(batch) returns an object with a scalar `.loss`, so one step function and
one loop serve all three; the Ray Train job calls `train_step` from its workers.
"""

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn


def make_optimizer(
    model: nn.Module, lr: float = 3e-4, weight_decay: float = 0.1, betas=(0.9, 0.95)
) -> torch.optim.Optimizer:
    """AdamW as in the paper's recipes; no decay on norms, biases and other 1-D parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def as_tensor(batch: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(batch, dtype=torch.long, device=device)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: np.ndarray | torch.Tensor,
    max_grad_norm: float = 1.0,
) -> float:
    """One optimisation step on one batch of token ids; returns the loss."""
    model.train()
    loss = model(as_tensor(batch, next(model.parameters()).device)).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[np.ndarray], seed: int = 0) -> float:
    """Mean loss over fixed batches; the seed fixes CALM's sampled noise and targets."""
    model.eval()
    device = next(model.parameters()).device
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        losses = [model(as_tensor(b, device)).loss.item() for b in batches]
    return float(np.mean(losses))


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then a cosine decay to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fit(
    model: nn.Module,
    batches: Iterator[np.ndarray],
    steps: int,
    lr: float = 3e-4,
    warmup: int = 0,
    weight_decay: float = 0.1,
) -> list[float]:
    """Train for `steps` steps with linear warmup then a cosine decay to 10 %; returns the losses."""
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup, min_ratio=0.1)
    )
    losses = []
    for _ in range(steps):
        losses.append(train_step(model, optimizer, next(batches)))
        scheduler.step()
    return losses
