"""Benchmark of the temperature samplers on known chunk distributions; prints JSON.

`python -m pipeline.bench.sampling` reports
- speed: the vectorised samplers against a straightforward per-row Python loop on the same inputs
  (the approximate rule as the official code writes it: Counter + math.comb + random.choices;
  the exact algorithm calling `draw` for one row at a time);
- adaptive: mean draws per step (and `draw` calls) of the adaptive sampler against the
  fixed pool of N = 200, at several model confidences and temperatures, with each one's total
  variation distance to P^(1/T)/Z; `tv_noise_floor` is the TV that a perfect sampler shows with
  the same number of rows, so a TV at that level means no measurable bias.
A numpy categorical over chunks stands in for the model's head: timing covers the samplers and
their `draw` calls, not a network.
"""

import json
import math
import random
import time
from collections import Counter
from functools import partial

import numpy as np

from model.sampling import (
    adaptive_temperature_sample,
    approximate_temperature_sample,
    exact_temperature_sample,
    split_inverse_temperature,
)


class CategoricalChunks:
    """A known distribution over distinct chunks: row b draws chunk i with probability probs[b, i]
    (probs [M] or [1, M]: every row shares it).

    Chunk i is the K-token row `table[i]`; `draw` follows the sampling module's `ChunkDraw`.
    """

    def __init__(self, probs: np.ndarray, k: int, rng: np.random.Generator):
        probs = np.atleast_2d(np.asarray(probs, dtype=float))
        self.probs = probs / probs.sum(axis=1, keepdims=True)
        self.cdf = np.cumsum(self.probs, axis=1)
        self.cdf[:, -1] = 1.0
        m = self.probs.shape[1]
        self.table = 5 + np.arange(m)[:, None] * k + np.arange(k)[None, :]  # distinct token rows
        self.rng = rng
        self.calls = 0

    def draw(self, rows: np.ndarray) -> np.ndarray:
        self.calls += 1
        u = self.rng.random(rows.size)
        cdf = self.cdf[0] if self.cdf.shape[0] == 1 else self.cdf[rows]  # one row: shared by all
        index = (cdf < u[:, None]).sum(axis=1)
        return self.table[index]

    def index(self, chunks: np.ndarray) -> np.ndarray:
        """Chunk ids of [B, K] chunks drawn from this distribution."""
        return (chunks - 5)[:, 0] // self.table.shape[1]

    def target(self, temperature: float) -> np.ndarray:
        """[rows, M] P^(1/T) / Z."""
        tempered = self.probs ** (1.0 / temperature)
        return tempered / tempered.sum(axis=1, keepdims=True)


def confidence_distribution(top: float, m: int = 64) -> np.ndarray:
    """Top chunk with probability `top`, the rest geometrically decaying over m - 1 chunks."""
    rest = 0.8 ** np.arange(m - 1)
    return np.concatenate([[top], (1.0 - top) * rest / rest.sum()])


def total_variation(chunk_ids: np.ndarray, target: np.ndarray) -> float:
    frequencies = np.bincount(chunk_ids, minlength=target.size) / chunk_ids.size
    return 0.5 * float(np.abs(frequencies - target).sum())


# -- straightforward per-row references, timed against the vectorised samplers -----------------


def approximate_per_row(candidates: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """The official code's loop (integer 1/T): Counter per row, cascade n..1, C(count, m)."""
    n, _ = split_inverse_temperature(temperature)
    chooser = random.Random(seed)
    chosen = []
    for pool in candidates:
        counts = Counter(tuple(chunk.tolist()) for chunk in pool)
        for m in range(n, 0, -1):
            eligible = {chunk: c for chunk, c in counts.items() if c >= m}
            if eligible:
                weights = [math.comb(c, m) for c in eligible.values()]
                chosen.append(chooser.choices(list(eligible), weights=weights)[0])
                break
    return np.asarray(chosen)


def exact_per_row(
    draw, batch_size: int, temperature: float, rng: np.random.Generator
) -> np.ndarray:
    """The exact algorithm one row at a time, one `draw` call per draw."""
    n, a = split_inverse_temperature(temperature)
    chosen = []
    for row in range(batch_size):
        one = np.array([row])
        while True:
            reference = draw(one)[0]
            if not all((draw(one)[0] == reference).all() for _ in range(n - 1)):
                continue
            i = 1
            while a > 0 and not (draw(one)[0] == reference).all():
                if rng.random() < a / i:
                    break
                i += 1
            else:
                chosen.append(reference)
                break
    return np.stack(chosen)


def _seconds(run, repeats: int = 3) -> float:
    """Best of `repeats` wall-clock runs."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def bench_speed(batch_size: int = 32, pool_size: int = 200, k: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tops = np.linspace(0.3, 0.9, batch_size)
    model = CategoricalChunks(np.stack([confidence_distribution(t) for t in tops]), k, rng)
    candidates = model.draw(np.repeat(np.arange(batch_size), pool_size)).reshape(
        batch_size, pool_size, k
    )
    report = {"batch_size": batch_size, "pool_size": pool_size, "k": k}
    for temperature in (0.5, 1 / 3):
        vectorised = _seconds(partial(approximate_temperature_sample, candidates, temperature, rng))
        per_row = _seconds(partial(approximate_per_row, candidates, temperature, seed))
        exact_args = (model.draw, batch_size, temperature, rng)
        exact_vec = _seconds(partial(exact_temperature_sample, *exact_args))
        exact_row = _seconds(partial(exact_per_row, *exact_args))
        calls = []
        for sampler in (exact_temperature_sample, exact_per_row):
            model.calls = 0
            sampler(*exact_args)
            calls.append(model.calls)
        report[f"T={temperature:.3g}"] = {
            "approximate_vectorised_ms": 1e3 * vectorised,
            "approximate_per_row_ms": 1e3 * per_row,
            "approximate_speedup": per_row / vectorised,
            "exact_vectorised_ms": 1e3 * exact_vec,
            "exact_per_row_ms": 1e3 * exact_row,
            "exact_speedup": exact_row / exact_vec,
            "exact_vectorised_draw_calls": calls[0],
            "exact_per_row_draw_calls": calls[1],
        }
    return report


def bench_adaptive(
    rows: int = 10_000, pool_size: int = 200, k: int = 4, seed: int = 0
) -> list[dict]:
    rng = np.random.default_rng(seed)
    cases = {f"top={top}": confidence_distribution(top) for top in (0.9, 0.6, 0.3)}
    cases["zipf-1000"] = 1.0 / np.arange(1, 1001)
    results = []
    for name, probs in cases.items():
        for temperature in (0.7, 0.5, 1 / 3):
            model = CategoricalChunks(probs, k, rng)
            target = model.target(temperature)[0]
            floor = np.mean(
                [total_variation(rng.choice(target.size, rows, p=target), target) for _ in range(5)]
            )
            pool = model.draw(np.arange(rows * pool_size)).reshape(rows, pool_size, k)
            pooled = approximate_temperature_sample(pool, temperature, rng)
            entry = {
                "distribution": name,
                "temperature": round(temperature, 4),
                "tv_noise_floor": floor,
                "pool_draws": pool_size,
                "pool_tv": total_variation(model.index(pooled), target),
            }
            model.calls = 0
            out = adaptive_temperature_sample(model.draw, rows, temperature, rng, pool_size)
            entry |= {
                "adaptive_mean_draws": float(out.draws.mean()),
                "adaptive_draw_calls": model.calls,
                "adaptive_fallback_rate": float(out.fallback.mean()),
                "adaptive_tv": total_variation(model.index(out.chunks), target),
            }
            results.append(entry)
    return results


def main() -> None:
    print(json.dumps({"speed": bench_speed(), "adaptive": bench_adaptive()}, indent=1))


if __name__ == "__main__":
    main()
