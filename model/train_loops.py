"""Plain single-process training for the autoencoder, CALM (autoencoder frozen) and the AR baseline.

Every model's forward(batch) returns an object with a scalar `.loss`, so one step function and
one loop serve all three; the Ray Train job calls `train_step` from its workers.
"""

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from model.data import Batch


def make_optimizer(
    model: nn.Module,
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    betas=(0.9, 0.95),
    lr_ratios: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW as in the paper's recipes; no decay on norms, biases and other 1-D parameters.

    `lr_ratios` maps a parameter-name prefix to a learning-rate multiplier (e.g. the energy head
    at a quarter of the backbone's rate, as the CALM authors train theirs)."""
    ratios = {"": 1.0} | dict(lr_ratios or {})
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {
        (prefix, decay): [] for prefix in ratios for decay in (True, False)
    }
    for name, p in model.named_parameters():
        if p.requires_grad:
            prefix = max((x for x in ratios if name.startswith(x)), key=len)
            groups[prefix, p.ndim >= 2].append(p)
    return torch.optim.AdamW(
        [
            {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr": lr * ratios[x]}
            for (x, decay), params in groups.items()
            if params or x == ""
        ],
        lr=lr,
        betas=betas,
    )


def as_tensor(batch: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(batch, dtype=torch.long, device=device)


def model_inputs(batch: Batch, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """The forward arguments of a batch: (ids,) or (ids, targets)."""
    if isinstance(batch, tuple):
        ids, targets = batch
        return as_tensor(ids, device), torch.as_tensor(targets, dtype=torch.bool, device=device)
    return (as_tensor(batch, device),)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    max_grad_norm: float = 1.0,
    autocast: torch.dtype | None = None,
) -> float:
    """One optimisation step on one batch of token ids; returns the loss. `autocast` runs the
    forward pass in that dtype where torch's autocast allows (bfloat16 on a CPU)."""
    model.train()
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        loss = model(*model_inputs(batch, device)).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable[Batch], seed: int = 0) -> float:
    """Mean loss over fixed batches; the seed fixes CALM's sampled noise and targets."""
    model.eval()
    device = next(model.parameters()).device
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        losses = [model(*model_inputs(b, device)).loss.item() for b in batches]
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
