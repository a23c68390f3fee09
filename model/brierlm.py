"""BrierLM: likelihood-free evaluation of language models (numpy only).

The Brier score of a predictive distribution P for the outcome y is 2 P(y) - sum_x P(x)^2
(1 minus the squared error; 1 for a certain correct prediction, about 0 for a uniform guess over
many outcomes, -1 for a certain wrong one). Brier-n takes the next n tokens as one outcome.
Three unbiased estimators (docs/model.md, "BrierLM"):

- two_sample:    1{x1 = y} + 1{x2 = y} - 1{x1 = x2}, from two independent samples x1, x2. Needs
                 only a sampler, so it serves CALM and a discrete model alike.
- probability:   2 P(y) - 1{x1 = x2}, the official discrete-model form: exact accuracy term.
- rao_blackwell: 2 P(y) - (P(x1) + P(x2)) / 2. Since E[1{x1 = x2} | x1] = P(x1), the collision
                 term is a conditional expectation too, so the variance only drops further.

BrierLM = 100 * (Brier-1 * Brier-2 * Brier-3 * Brier-4)^(1/4). A geometric mean of a non-positive
number is undefined; an estimate <= 0 means no skill on that scale, so it counts as 0 and BrierLM
is 0 (its standard error is then NaN).

`evaluate_brier` is the model-agnostic driver: a model plugs in through the `ContinuationSampler`
(and, for discrete models, `NgramProbability`) protocols.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

N_MAX = 4  # Brier-1..4


class ContinuationSampler(Protocol):
    def __call__(self, prefixes: list[np.ndarray], n_tokens: int, seed: int) -> np.ndarray:
        """[B, n_tokens] integer token ids: one sampled continuation of each prefix.

        Rows are independent draws; the same seed gives the same output. CALM with K < n_tokens
        rolls out ceil(n_tokens / K) steps; with K >= n_tokens it returns its next chunk's first
        n_tokens tokens.
        """
        ...


class NgramProbability(Protocol):
    def __call__(self, prefixes: list[np.ndarray], continuations: np.ndarray) -> np.ndarray:
        """[B, n] with entry j = P(continuations[b, :j+1] | prefixes[b]): cumulative n-gram
        probabilities of the given continuations [B, n] (a discrete model: product of the
        per-token conditionals)."""
        ...


def _rows(*arrays: np.ndarray) -> None:
    if any(x.ndim != 2 or x.shape != arrays[0].shape for x in arrays):
        raise ValueError(
            f"outcomes must be [B, n] arrays of one shape, got {[x.shape for x in arrays]}"
        )


def brier_two_sample(x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[B] 1{x1=y} + 1{x2=y} - 1{x1=x2}, each outcome a whole row of [B, n]."""
    _rows(x1, x2, y)
    hit1, hit2, collide = ((a == b).all(axis=1) for a, b in ((x1, y), (x2, y), (x1, x2)))
    return hit1.astype(float) + hit2 - collide


def brier_probability(p_true: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """[B] 2 P(y) - 1{x1=x2}, with P(y) [B] the model's exact probability of the true outcome."""
    _rows(x1, x2)
    return 2.0 * np.asarray(p_true, dtype=float) - (x1 == x2).all(axis=1)


def brier_rao_blackwell(p_true: np.ndarray, p_x1: np.ndarray, p_x2: np.ndarray) -> np.ndarray:
    """[B] 2 P(y) - (P(x1) + P(x2)) / 2, the lowest-variance form, from exact probabilities."""
    return 2.0 * np.asarray(p_true, dtype=float) - 0.5 * (np.asarray(p_x1) + np.asarray(p_x2))


def brier_lm(briers: Sequence[float]) -> float:
    """100 * geometric mean of Brier-1..4 (0 when any estimate is <= 0, see the module doc)."""
    b = np.asarray(briers, dtype=float)
    if b.ndim != 1 or b.size == 0 or not np.isfinite(b).all():
        raise ValueError(f"briers must be a non-empty sequence of finite numbers, got {briers!r}")
    if (b <= 0).any():
        return 0.0
    return float(100.0 * np.exp(np.log(b).mean()))


@dataclass(frozen=True)
class BrierScores:
    brier: np.ndarray  # [n] Brier-1..n
    stderr: np.ndarray  # [n] standard errors
    brier_lm: float
    brier_lm_stderr: float  # delta method on the covariance of Brier-1..n
    positions: int

    def to_dict(self) -> dict:
        return {
            **{f"brier_{i + 1}": float(v) for i, v in enumerate(self.brier)},
            **{f"brier_{i + 1}_stderr": float(v) for i, v in enumerate(self.stderr)},
            "brier_lm": self.brier_lm,
            "brier_lm_stderr": self.brier_lm_stderr,
            "positions": self.positions,
        }


def aggregate_brier(per_position: np.ndarray, groups: np.ndarray | None = None) -> BrierScores:
    """Means and standard errors of per-position estimates [P, n] (column j: Brier-(j+1)).

    Positions of one document are correlated, so with `groups` ([P] document ids) the covariance
    of the means is the cluster-robust one, sum over groups of (summed deviations)^2 / P^2 with
    the G / (G - 1) correction; without, positions count as independent.
    """
    if per_position.ndim != 2 or per_position.shape[0] < 2:
        raise ValueError(f"need per-position estimates [P >= 2, n], got {per_position.shape}")
    count = per_position.shape[0]
    mean = per_position.mean(axis=0)
    deviations = per_position - mean
    if groups is None:
        groups = np.arange(count)
    _, group = np.unique(groups, return_inverse=True)
    clusters = group.max() + 1
    if clusters < 2:
        raise ValueError("standard errors need positions from at least 2 groups")
    sums = np.zeros((clusters, mean.size))
    np.add.at(sums, group, deviations)
    covariance = sums.T @ sums / count**2 * clusters / (clusters - 1)
    score = brier_lm(mean)
    if score > 0:
        gradient = score / (mean.size * mean)  # d(100 * prod(b)^(1/n)) / d b_j
        score_stderr = float(np.sqrt(gradient @ covariance @ gradient))
    else:
        score_stderr = float("nan")
    return BrierScores(mean, np.sqrt(np.diag(covariance)), score, score_stderr, count)


def evaluation_positions(lengths: Sequence[int], k: int, min_context: int = 1) -> np.ndarray:
    """[P, 2] (document, position t) pairs: the n-gram at t..t+3 is predicted from tokens [:t].

    t runs over the chunk boundaries of each document (multiples of K counted from its first
    token, where CALM's chunks start), with t >= min_context and a whole 4-gram left after t.
    A discrete model (K = 1) is evaluated at every position.
    """
    if k < 1 or min_context < 1:
        raise ValueError(f"k and min_context must be >= 1, got k={k}, min_context={min_context}")
    first = -(-min_context // k) * k
    pairs = [
        (d, t) for d, length in enumerate(lengths) for t in range(first, length - N_MAX + 1, k)
    ]
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


@dataclass(frozen=True)
class BrierReport:
    estimators: dict[str, BrierScores]  # "two_sample", plus "probability", "rao_blackwell"

    def to_dict(self) -> dict:
        return {name: scores.to_dict() for name, scores in self.estimators.items()}


def _checked(values: np.ndarray, shape: tuple[int, int], what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != shape:
        raise ValueError(f"{what} returned shape {values.shape}, expected {shape}")
    return values


def evaluate_brier(
    documents: Sequence[np.ndarray],
    k: int,
    sample: ContinuationSampler,
    probability: NgramProbability | None = None,
    *,
    min_context: int = 1,
    batch_size: int = 64,
    max_positions: int | None = None,
    seed: int = 0,
) -> BrierReport:
    """Brier-1..4 and BrierLM of a model over `documents` (1-D token-id arrays, as the model reads
    them, e.g. starting with <bos>).

    Positions come from `evaluation_positions`; `max_positions` keeps a seeded uniform subset of
    them; standard errors are clustered by document. Positions are evaluated in batches of `batch_size`: two `sample` calls with distinct
    seeds give x1 and x2 (4 tokens each), and, with `probability`, one call scores the truth, x1
    and x2 together.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    documents = [np.asarray(doc) for doc in documents]
    if any(doc.ndim != 1 or not np.issubdtype(doc.dtype, np.integer) for doc in documents):
        raise ValueError("documents must be 1-D integer token-id arrays")
    rng = np.random.default_rng(seed)
    positions = evaluation_positions([doc.size for doc in documents], k, min_context)
    if max_positions is not None and positions.shape[0] > max_positions:
        positions = positions[np.sort(rng.choice(positions.shape[0], max_positions, replace=False))]
    if positions.shape[0] < 2:
        raise ValueError("fewer than 2 evaluation positions: documents too short for 4-grams")
    per_estimator: dict[str, list[np.ndarray]] = {"two_sample": []}
    if probability is not None:
        per_estimator |= {"probability": [], "rao_blackwell": []}
    for start in range(0, positions.shape[0], batch_size):
        batch = positions[start : start + batch_size]
        prefixes = [documents[d][:t] for d, t in batch]
        truth = np.stack([documents[d][t : t + N_MAX] for d, t in batch])
        shape = truth.shape
        seed_1, seed_2 = (int(s) for s in rng.integers(0, 2**31 - 1, size=2))
        x1 = _checked(sample(prefixes, N_MAX, seed_1), shape, "sample")
        x2 = _checked(sample(prefixes, N_MAX, seed_2), shape, "sample")
        ns = range(1, N_MAX + 1)
        per_estimator["two_sample"].append(
            np.stack([brier_two_sample(x1[:, :n], x2[:, :n], truth[:, :n]) for n in ns], axis=1)
        )
        if probability is not None:
            scored = probability(prefixes * 3, np.concatenate([truth, x1, x2]))
            p_true, p_x1, p_x2 = np.split(_checked(scored, (3 * shape[0], N_MAX), "probability"), 3)
            per_estimator["probability"].append(
                np.stack([brier_probability(p_true[:, n - 1], x1[:, :n], x2[:, :n]) for n in ns], 1)
            )
            per_estimator["rao_blackwell"].append(brier_rao_blackwell(p_true, p_x1, p_x2))
    documents_of = positions[:, 0]  # standard errors clustered by document
    return BrierReport(
        {
            name: aggregate_brier(np.concatenate(parts), documents_of)
            for name, parts in per_estimator.items()
        }
    )
