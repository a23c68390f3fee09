"""The energy loss is an unbiased estimate of a strictly proper score (alpha = 1).

For a fixed target Gaussian, the expected loss is lowest when the model's samples come from the
target itself and higher for shifted or rescaled distributions. The loss is averaged over many
independent positions; a gap counts when it exceeds Z standard errors of the paired differences
(all candidates see the same target draws), and a closed form checks the estimator's mean.
"""

import math

import pytest
import torch

from model.calm import energy_loss

torch.set_num_threads(1)
Z = 4.0  # one-sided, about 3e-5 false-alarm probability per comparison
POSITIONS, N, M, D = 20000, 8, 100, 16


def losses(model_mean: float, model_std: float, seed: int) -> torch.Tensor:
    """Per-position loss for model samples ~ N(model_mean, model_std^2 I) against targets drawn
    from N(0, I) with a fixed generator (the same target draws for every candidate)."""
    g = torch.Generator().manual_seed(seed)
    samples = model_mean + model_std * torch.randn(POSITIONS, N, D, generator=g)
    zeros = torch.zeros(POSITIONS, D)
    return energy_loss(samples, zeros, zeros, M, torch.Generator().manual_seed(seed + 1))


@pytest.mark.parametrize(
    "model_mean,model_std",
    [(0.25, 1.0), (-0.25, 1.0), (0.0, 1.3), (0.0, 0.75), (0.0, 0.0), (0.25, 0.8)],
    ids=["shift+", "shift-", "wider", "narrower", "point-mass", "shift-and-narrower"],
)
def test_true_distribution_scores_best(model_mean: float, model_std: float) -> None:
    truth = losses(0.0, 1.0, seed=0)
    other = losses(model_mean, model_std, seed=0)
    gap = other - truth  # paired: same positions, same targets
    stderr = gap.std() / math.sqrt(POSITIONS)
    assert gap.mean() > Z * stderr, (gap.mean().item(), stderr.item())


def folded_normal_mean(mu: float, sigma: float) -> float:
    """E|W| for W ~ N(mu, sigma^2)."""
    return sigma * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * sigma**2)) + mu * math.erf(
        mu / (sigma * math.sqrt(2))
    )


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.5])
def test_estimator_is_unbiased_in_one_dimension(shift: float) -> None:
    """1-D, target N(0, 1), model N(shift, 1): E[loss] = 2 E|X - Y| - E|X - X'|, closed form."""
    g = torch.Generator().manual_seed(7)
    samples = shift + torch.randn(POSITIONS, N, 1, generator=g)
    zeros = torch.zeros(POSITIONS, 1)
    loss = energy_loss(samples, zeros, zeros, M, torch.Generator().manual_seed(8))
    expected = 2 * folded_normal_mean(shift, math.sqrt(2)) - folded_normal_mean(0.0, math.sqrt(2))
    stderr = loss.std().item() / math.sqrt(POSITIONS)
    assert abs(loss.mean().item() - expected) < Z * stderr, (loss.mean().item(), expected, stderr)
