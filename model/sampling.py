"""Likelihood-free temperature sampling over chunks (numpy only: the onnxruntime engine reuses it).

CALM has no likelihood, only a sampler of K-token chunks. Sampling at temperature T means drawing a
chunk x with probability P(x)^(1/T) / Z using nothing but draws from P (docs/model.md, "Temperature
without a likelihood"). Write 1/T = n + a with n an integer and 0 <= a < 1.

Three samplers, all vectorised over the batch (loops run over draws or rounds, never over rows):

- `exact_temperature_sample`: the paper's exact algorithm. A trial draws chunks until n identical
  ones are in hand (a mismatch ends the trial early: restarting at the first mismatch is the same
  rejection as checking all n at the end); the common value is x*. If a > 0, a Bernoulli factory
  turns P(x*)^n into P(x*)^(n+a): for i = 1, 2, ... draw x; x == x* accepts, otherwise the whole
  trial is rejected with probability a/i. Since sum_i p (1-p)^(i-1) prod_{j<i} (1 - a/j) = p^a,
  x* is accepted with probability P(x*)^n P(x*)^a.
- `approximate_temperature_sample`: the paper's batched rule over a fixed pool of N candidates.
- `adaptive_temperature_sample`: the exact algorithm fed in growing rounds, stopping a row as soon
  as it accepts; a row that reaches the approximate rule's pool size falls back to the approximate
  rule over everything it drew. Its output equals the exact sampler's whenever the row accepts, so
  its total-variation distance to P^(1/T)/Z is at most the fraction of rows that fell back
  (reported per row). A confident model pays a few draws instead of the pool's 200.

A `draw` callable gives one independent chunk per entry of `rows` (rows may repeat), so a model
runs only for the rows still active and can batch several draws per row in one call. T = 1 costs a
single draw in the exact and adaptive samplers.
"""

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np


class ChunkDraw(Protocol):
    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """One independent chunk sample [len(rows), K] (integer token ids) per entry of `rows`.

        `rows` holds batch-row indices; an index may repeat, and each repeat is a fresh draw.
        """
        ...


# One generator for the whole batch, or one per batch row: then every uniform a row uses comes from
# its own generator, so its output does not depend on its batch-mates (per-request seeds).
Rng = np.random.Generator | Sequence[np.random.Generator]


def _uniforms(rng: Rng, rows: np.ndarray, needed: np.ndarray | None = None) -> np.ndarray:
    """One uniform in [0, 1) per entry of `rows` (batch-row indices).

    A shared generator draws for every entry (its stream is the same as before per-row support);
    per-row generators draw only where `needed` (default: everywhere) and the rest read 1.0, so a
    row's stream advances by its own decisions only.
    """
    if isinstance(rng, np.random.Generator):
        return rng.random(rows.size)
    u = np.ones(rows.size)
    for j in np.flatnonzero(np.ones(rows.size, dtype=bool) if needed is None else needed):
        u[j] = rng[rows[j]].random()
    return u


def _rows_rng(rng: Rng, rows: np.ndarray) -> Rng:
    """The generator(s) for a subset of the batch rows, re-indexed 0..len(rows)-1."""
    return rng if isinstance(rng, np.random.Generator) else [rng[r] for r in rows]


class Sampled(NamedTuple):
    chunks: np.ndarray  # [B, K] the chosen chunk of each row
    draws: np.ndarray  # [B] chunks the row drew (its cost), speculative draws of a round included
    fallback: np.ndarray  # [B] True where the approximate rule chose, not an exact acceptance


def split_inverse_temperature(temperature: float) -> tuple[int, float]:
    """1/T = n + a with n >= 1 an integer and 0 <= a < 1 (1/T within 1e-9 of an integer snaps)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number in (0, 1], got {temperature!r}")
    if not 0.0 < temperature <= 1.0:
        raise ValueError(f"temperature must be in (0, 1], got {temperature!r}")
    inverse = 1.0 / temperature
    nearest = round(inverse)
    if abs(inverse - nearest) <= 1e-9:
        return nearest, 0.0
    n = math.floor(inverse)
    return n, inverse - n


# ------------------------------------------------------------------------------------------------
# Approximate rule over a pool of candidates


def chunk_counts(candidates: np.ndarray) -> np.ndarray:
    """[B, N] count of each candidate's chunk within its own row of candidates [B, N, K].

    One lexicographic sort of (row, tokens) groups identical chunks of a row next to each other.
    """
    if candidates.ndim != 3 or candidates.shape[1] == 0:
        raise ValueError(f"candidates must be [B, N>=1, K], got shape {candidates.shape}")
    b, n, k = candidates.shape
    flat = candidates.reshape(b * n, k)
    row = np.repeat(np.arange(b), n)
    order = np.lexsort([flat[:, j] for j in reversed(range(k))] + [row])
    flat, row = flat[order], row[order]
    starts = np.ones(b * n, dtype=bool)
    starts[1:] = (row[1:] != row[:-1]) | (flat[1:] != flat[:-1]).any(axis=1)
    group = np.cumsum(starts) - 1
    counts = np.empty(b * n, dtype=np.int64)
    counts[order] = np.bincount(group)[group]
    return counts.reshape(b, n)


def _log_gamma_shifted(upto: int, shift: float) -> np.ndarray:
    """Table t[x] = log Gamma(x - shift) for integers x = 1..upto (t[0] unused), 0 <= shift < 1."""
    steps = np.log(np.arange(1, upto) - shift)
    return np.concatenate(
        [[0.0, math.lgamma(1.0 - shift)], math.lgamma(1.0 - shift) + np.cumsum(steps)]
    )


def selection_probabilities(candidates: np.ndarray, temperature: float) -> np.ndarray:
    """[B, N] probability that the approximate rule returns each candidate slot.

    The paper's rule: with r = 1/T, for m = r, r-1, ... pick among chunks seen >= m times with
    weight C(count, m), at the first m that has any. That first m is the largest r - j <= the
    row's highest count. Spreading a chunk's weight evenly over its `count` slots gives each slot
    C(count, m) / count = Gamma(count) / (Gamma(m+1) Gamma(count-m+1)).

    Fractional 1/T (the official code accepts integers only): C(count, m) is the generalised
    binomial coefficient Gamma(count+1) / (Gamma(m+1) Gamma(count-m+1)). It equals the paper's
    weight when 1/T is an integer, and for large counts it is proportional to count^(1/T)
    (1 + O(1/count)), so the rule still tends to P^(1/T)/Z as N grows.
    """
    n, a = split_inverse_temperature(temperature)
    counts = chunk_counts(candidates)
    inverse = n + a
    # largest level m = inverse - j (j = 0, 1, ...) that some chunk of the row reaches
    j = np.maximum(0, np.ceil(inverse - counts.max(axis=1) - 1e-9)).astype(np.int64)
    level = inverse - j
    eligible = counts >= level[:, None] - 1e-9
    # log Gamma(count) - log Gamma(count - m + 1), where count - m + 1 = (count + j - n + 1) - a
    log_gamma_int = _log_gamma_shifted(candidates.shape[1] + 1, 0.0)
    log_gamma_frac = _log_gamma_shifted(candidates.shape[1] + n + 2, a)
    shifted = np.where(eligible, counts + j[:, None] - n + 1, 1)
    log_weight = np.where(eligible, log_gamma_int[counts] - log_gamma_frac[shifted], -np.inf)
    weight = np.exp(log_weight - log_weight.max(axis=1, keepdims=True))
    return weight / weight.sum(axis=1, keepdims=True)


def _pick_slots(probabilities: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Inverse-CDF choice of one slot per row (a zero-probability slot is never chosen)."""
    cdf = np.cumsum(probabilities, axis=1)
    slot = (cdf <= uniforms[:, None] * cdf[:, -1:]).sum(axis=1)
    return np.minimum(slot, probabilities.shape[1] - 1)


def approximate_temperature_sample(
    candidates: np.ndarray, temperature: float, rng: Rng
) -> np.ndarray:
    """[B, K] one chunk per row chosen from its N candidates [B, N, K] by the paper's pool rule.

    Biased for finite N (a row whose chunks are all distinct returns a plain draw), exact as N grows.
    """
    probabilities = selection_probabilities(candidates, temperature)
    slot = _pick_slots(probabilities, _uniforms(rng, np.arange(candidates.shape[0])))
    return candidates[np.arange(candidates.shape[0]), slot]


# ------------------------------------------------------------------------------------------------
# Exact rejection, fed in rounds of draws


def _draw_rows(draw: ChunkDraw, rows: np.ndarray) -> np.ndarray:
    chunks = np.asarray(draw(rows))
    if (
        chunks.ndim != 2
        or chunks.shape[0] != rows.size
        or not np.issubdtype(chunks.dtype, np.integer)
    ):
        raise ValueError(
            f"draw(rows) must return integer token ids of shape [{rows.size}, K], "
            f"got {chunks.dtype} {chunks.shape}"
        )
    return chunks


def _rejection_sample(
    draw: ChunkDraw,
    batch_size: int,
    temperature: float,
    rng: Rng,
    *,
    max_draws: int,
    first_round: int,
    growth: int,
) -> Sampled:
    """The exact algorithm over rounds of draws; rows that hit the cap use the pool rule.

    Each round every still-active row draws `round_size` chunks in one `draw` call; the state
    machine then consumes them in order, one column at a time for all rows together. Draws left in
    a round after a row accepts are discarded, which keeps the accepted chunk exact (the draws are
    i.i.d. and the stopping rule only looks at the past).
    """
    if batch_size < 1 or max_draws < 1 or first_round < 1 or growth < 1:
        raise ValueError("batch_size, max_draws, first_round and growth must be >= 1")
    n, a = split_inverse_temperature(temperature)
    draws = np.zeros(batch_size, dtype=np.int64)
    fallback = np.zeros(batch_size, dtype=bool)
    chunks = pool = reference = None
    active = np.arange(batch_size)
    matched = np.zeros(batch_size, dtype=np.int64)  # identical draws collected in the trial (<= n)
    step = np.zeros(batch_size, dtype=np.int64)  # Bernoulli-factory index i once matched == n
    used, round_size = 0, first_round
    while active.size:
        size = min(round_size, max_draws - used)
        x = _draw_rows(draw, np.repeat(active, size)).reshape(active.size, size, -1)
        if pool is None:
            chunks = np.empty((batch_size, x.shape[-1]), dtype=x.dtype)
            reference = np.empty_like(chunks)
            pool = np.empty((batch_size, 0, x.shape[-1]), dtype=x.dtype)
        if used + size > pool.shape[1]:  # keep every draw for the fallback; grow geometrically
            capacity = min(max_draws, max(used + size, 2 * pool.shape[1]))
            extra = np.empty((batch_size, capacity - pool.shape[1], x.shape[-1]), dtype=x.dtype)
            pool = np.concatenate([pool, extra], axis=1)
        pool[active, used : used + size] = x
        draws[active] = used + size
        done = np.zeros(active.size, dtype=bool)
        for column in range(size):
            live, xj = ~done, x[:, column]
            same = (xj == reference).all(axis=1)
            collecting = live & (matched < n)
            first = collecting & (matched == 0)
            reference[first] = xj[first]
            grows = collecting & (first | same)
            matched = np.where(grows, matched + 1, np.where(collecting, 0, matched))
            entered = grows & (matched == n)
            factory = live & ~collecting
            miss = factory & ~same
            reject = miss & (_uniforms(rng, active, miss) * step < a) if a > 0 else miss
            step = np.where(entered, 1, np.where(miss & ~reject, step + 1, step))
            matched[reject] = 0
            accept = (factory & same) | (entered & (a == 0.0))
            chunks[active[accept]] = reference[accept]
            done |= accept
            if done.all():
                break
        used += size
        capped = ~done if used >= max_draws else np.zeros_like(done)
        if capped.any():
            rows = active[capped]
            chunks[rows] = approximate_temperature_sample(
                pool[rows, :used], temperature, _rows_rng(rng, rows)
            )
            fallback[rows] = True
        keep = ~done & ~capped
        active, reference, matched, step = active[keep], reference[keep], matched[keep], step[keep]
        round_size *= growth
    return Sampled(chunks, draws, fallback)


def exact_temperature_sample(
    draw: ChunkDraw,
    batch_size: int,
    temperature: float,
    rng: Rng,
    max_draws: int = 4096,
    draws_per_round: int = 1,
) -> Sampled:
    """[B, K] chunks distributed exactly as P^(1/T)/Z for any T in (0, 1].

    Each round, every row still running draws `draws_per_round` chunks in one `draw` call. A row
    that has drawn `max_draws` chunks without accepting (a distribution so flat that P(x)^(1/T) is
    tiny everywhere) falls back to the approximate rule over all its draws, so no row ever hangs;
    `Sampled.fallback` marks those rows.
    """
    return _rejection_sample(
        draw,
        batch_size,
        temperature,
        rng,
        max_draws=max_draws,
        first_round=draws_per_round,
        growth=1,
    )


def adaptive_temperature_sample(
    draw: ChunkDraw,
    batch_size: int,
    temperature: float,
    rng: Rng,
    max_draws: int = 200,
) -> Sampled:
    """The exact algorithm in doubling rounds, capped at the approximate rule's pool size.

    Round sizes are n+1, 2(n+1), 4(n+1), ... (n when 1/T is an integer, so T = 1 is one draw): few
    `draw` calls, at the price of the draws left unused in a row's last round. A row stops as soon
    as it accepts (an exact sample); otherwise at `max_draws` (the paper's N = 200) it takes the
    approximate rule over its draws, as the fixed-pool sampler would. Bias: coupled with the
    uncapped exact algorithm on the same draws, the output differs only in rows that fell back, so
    TV(output, P^(1/T)/Z) <= P(fallback), observable per row in `Sampled.fallback`.

    Tried and dropped: also stopping a row, by the pool rule, once its most frequent chunk had been
    seen 16 times saved at most a third of the draws on the benchmark's distributions, for up to
    three times the TV distance.
    """
    n, a = split_inverse_temperature(temperature)
    return _rejection_sample(
        draw,
        batch_size,
        temperature,
        rng,
        max_draws=max_draws,
        first_round=n + (a > 0),
        growth=2,
    )
