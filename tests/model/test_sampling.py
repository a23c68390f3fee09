"""Likelihood-free temperature samplers against known chunk distributions.

A numpy categorical over 8 distinct chunks of K = 4 tokens plays the model. Frequencies are checked
against P^(1/T)/Z with a chi-square test (fixed seeds; bins with an expected count under 5 are
pooled); two row groups with different distributions share each batch, so a row mixing up another
row's state would show.
"""

import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from scipy.special import chdtrc  # chi-square survival function
from support import REPO

from model.sampling import (
    adaptive_temperature_sample,
    approximate_temperature_sample,
    chunk_counts,
    exact_temperature_sample,
    selection_probabilities,
    split_inverse_temperature,
)
from pipeline.bench.sampling import CategoricalChunks

K = 4
PROBS = np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.07, 0.04, 0.02])
GROUPS = np.stack([PROBS, PROBS[::-1]])  # row b follows GROUPS[b % 2]
TEMPERATURES = [1.0, 0.5, 1 / 3, 0.7]
ROWS = 3000
P_VALUE_FLOOR = 1e-3


def grouped_model(rows: int, seed: int) -> CategoricalChunks:
    return CategoricalChunks(GROUPS[np.arange(rows) % 2], K, np.random.default_rng(seed))


def chi_square_p_value(chunk_ids: np.ndarray, target: np.ndarray) -> float:
    observed = np.bincount(chunk_ids, minlength=target.size).astype(float)
    expected = target * chunk_ids.size
    small = expected < 5
    if small.any():  # pool the rare bins so the chi-square approximation holds
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    statistic = ((observed - expected) ** 2 / expected).sum()
    return float(chdtrc(observed.size - 1, statistic))


def assert_tempered(model: CategoricalChunks, chunks: np.ndarray, temperature: float) -> None:
    ids = model.index(chunks)
    for group in range(2):
        target = model.target(temperature)[group]
        p = chi_square_p_value(ids[group::2], target)
        assert p > P_VALUE_FLOOR, f"group {group}, T={temperature}: chi-square p = {p:.2g}"


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_exact_sampler_matches_tempered_distribution(temperature):
    model = grouped_model(ROWS, seed=1)
    out = exact_temperature_sample(model.draw, ROWS, temperature, np.random.default_rng(2))
    assert not out.fallback.any()
    assert_tempered(model, out.chunks, temperature)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_adaptive_sampler_matches_tempered_distribution(temperature):
    model = grouped_model(ROWS, seed=3)
    out = adaptive_temperature_sample(model.draw, ROWS, temperature, np.random.default_rng(4))
    assert out.fallback.mean() < 0.05  # its TV bound
    assert_tempered(model, out.chunks, temperature)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_approximate_sampler_matches_tempered_distribution_with_a_large_pool(temperature):
    model = grouped_model(ROWS, seed=5)
    pool = model.draw(np.repeat(np.arange(ROWS), 400)).reshape(ROWS, 400, K)
    chunks = approximate_temperature_sample(pool, temperature, np.random.default_rng(6))
    assert_tempered(model, chunks, temperature)


def output_distribution(model: CategoricalChunks, pool: np.ndarray, temperature: float):
    """The approximate rule's chunk distribution, averaged over pools without a final draw."""
    probabilities = selection_probabilities(pool, temperature)
    ids = model.index(pool.reshape(-1, K))
    return np.bincount(ids, weights=probabilities.ravel(), minlength=PROBS.size) / pool.shape[0]


@pytest.mark.parametrize("temperature", [0.5, 0.7])
def test_approximate_sampler_converges_as_the_pool_grows(temperature):
    model = CategoricalChunks(PROBS, K, np.random.default_rng(7))
    target = model.target(temperature)[0]
    distances = []
    for pool_size in (4, 32, 256):
        pool = model.draw(np.zeros(2000 * pool_size, dtype=np.int64)).reshape(2000, pool_size, K)
        distances.append(0.5 * np.abs(output_distribution(model, pool, temperature) - target).sum())
    assert distances[0] > 2 * distances[1] > 4 * distances[2], distances


def reference_selection(pool: np.ndarray, temperature: float) -> dict[tuple, float]:
    """The paper's rule for one row, written plainly: cascade m = r, r-1, ...; weight C(c, m)."""
    n, a = split_inverse_temperature(temperature)
    counts = Counter(tuple(chunk) for chunk in pool.tolist())
    for j in range(n + 1):
        m = n + a - j
        eligible = {chunk: c for chunk, c in counts.items() if c >= m - 1e-9}
        if m > 0 and eligible:
            log_c = {
                x: math.lgamma(c + 1) - math.lgamma(m + 1) - math.lgamma(c - m + 1)
                for x, c in eligible.items()
            }
            top = max(log_c.values())
            weights = {x: math.exp(v - top) for x, v in log_c.items()}
            total = sum(weights.values())
            return {x: w / total for x, w in weights.items()}
    raise AssertionError("no level had candidates")


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1 / 3, 0.25, 0.7, 0.4, 0.3])
def test_selection_probabilities_equal_a_per_row_reference(temperature):
    rng = np.random.default_rng(8)
    # 8 distinct chunks, pools of 6: every cascade level, all-distinct pools included, occurs
    pool = rng.integers(0, 2, size=(300, 6, K))
    pool[:, :, 1] = 0
    assert (chunk_counts(pool).max(axis=1) == 1).any()
    probabilities = selection_probabilities(pool, temperature)
    for row in range(pool.shape[0]):
        expected = reference_selection(pool[row], temperature)
        got = Counter()
        for chunk, p in zip(map(tuple, pool[row].tolist()), probabilities[row]):
            got[chunk] += p
        assert got.keys() >= expected.keys()
        for chunk, p in got.items():
            assert p == pytest.approx(expected.get(chunk, 0.0), abs=1e-12)


def test_chunk_counts_counts_whole_chunks_per_row():
    pool = np.array([[[1, 2], [1, 2], [2, 1], [1, 2]], [[2, 1], [1, 2], [2, 1], [7, 7]]])
    assert chunk_counts(pool).tolist() == [[3, 3, 1, 3], [2, 1, 2, 1]]


class StreamDraw:
    """Serves each row its own fixed sequence of chunks, so runs are comparable draw for draw."""

    def __init__(self, streams: np.ndarray):
        self.streams = streams
        self.next = np.zeros(streams.shape[0], dtype=np.int64)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        assert (np.diff(rows) >= 0).all()  # the samplers ask for rows in order, repeats adjacent
        repeat = np.arange(rows.size) - np.searchsorted(rows, rows)
        chunks = self.streams[rows, self.next[rows] + repeat]
        np.add.at(self.next, rows, 1)
        return chunks


def exact_per_row_on_stream(stream: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Integer 1/T: the first run of n identical draws that starts a trial; a mismatch ends it."""
    i = 0
    while True:
        reference, run = stream[i], 1
        while run < n and (stream[i + run] == reference).all():
            run += 1
        if run == n:
            return reference, i + n
        i += run + 1  # the mismatching draw was consumed by the failed trial


@pytest.mark.parametrize("temperature", [1.0, 0.5, 1 / 3])
def test_vectorised_samplers_equal_a_per_row_loop_on_the_same_draws(temperature):
    n, _ = split_inverse_temperature(temperature)
    model = grouped_model(400, seed=9)
    streams = model.draw(np.repeat(np.arange(400), 1500)).reshape(400, 1500, K)
    reference = [exact_per_row_on_stream(stream, n) for stream in streams]
    expected_chunks = np.stack([chunk for chunk, _ in reference])
    exact = exact_temperature_sample(
        StreamDraw(streams), 400, temperature, np.random.default_rng(0), max_draws=1500
    )
    assert (exact.chunks == expected_chunks).all()
    assert exact.draws.tolist() == [draws for _, draws in reference]
    # the adaptive sampler consumes the same streams in bigger rounds: same chunk unless it fell back
    adaptive = adaptive_temperature_sample(
        StreamDraw(streams), 400, temperature, np.random.default_rng(0)
    )
    kept = ~adaptive.fallback
    assert kept.mean() > 0.9
    assert (adaptive.chunks[kept] == expected_chunks[kept]).all()
    assert (adaptive.draws[kept] >= exact.draws[kept]).all()


def expected_exact_draws(probs: np.ndarray, temperature: float) -> float:
    """Mean draws of the exact algorithm (Wald: draws per trial / acceptance per trial).

    A trial draws x*, then up to n-1 more while they match; with a > 0 the Bernoulli factory
    draws until a hit or a rejection, sum_i (1-p)^i prod_{j<=i} (1 - a/j) = p^(a-1) on average.
    """
    n, a = split_inverse_temperature(temperature)
    per_trial = 1 + sum((probs**j).sum() for j in range(1, n))
    if a > 0:
        per_trial += (probs ** (n - 1 + a)).sum()
    return per_trial / (probs ** (n + a)).sum()


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_exact_draw_counts_match_their_expectation(temperature):
    model = CategoricalChunks(PROBS, K, np.random.default_rng(10))
    out = exact_temperature_sample(model.draw, ROWS, temperature, np.random.default_rng(11))
    standard_error = out.draws.std() / math.sqrt(ROWS)
    error = abs(out.draws.mean() - expected_exact_draws(PROBS, temperature))
    assert error <= 5 * standard_error + 1e-9
    assert out.draws.min() >= split_inverse_temperature(temperature)[0]


def test_temperature_one_is_a_single_draw():
    model = grouped_model(50, seed=12)
    for sampler in (exact_temperature_sample, adaptive_temperature_sample):
        model.calls = 0
        out = sampler(model.draw, 50, 1.0, np.random.default_rng(0))
        assert out.draws.tolist() == [1] * 50 and model.calls == 1 and not out.fallback.any()


def test_adaptive_sampler_spends_few_draws_on_a_confident_model():
    model = CategoricalChunks(np.r_[0.95, np.full(7, 0.05 / 7)], K, np.random.default_rng(13))
    out = adaptive_temperature_sample(model.draw, 500, 1 / 3, np.random.default_rng(14))
    assert out.draws.mean() < 10 and out.draws.max() <= 200


def test_a_flat_distribution_hits_the_cap_and_falls_back_to_its_own_draws():
    rng = np.random.default_rng(15)
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def draw(rows):  # ~no two chunks ever coincide: no trial can succeed
        chunks = rng.integers(0, 50_000, size=(rows.size, K))
        seen.append((rows, chunks))
        return chunks

    out = exact_temperature_sample(draw, 8, 1 / 3, rng, max_draws=64, draws_per_round=5)
    assert out.fallback.all() and (out.draws == 64).all()
    rows = np.concatenate([r for r, _ in seen])
    chunks = np.concatenate([c for _, c in seen])
    for row in range(8):
        assert (chunks[rows == row] == out.chunks[row]).all(axis=1).any()


@pytest.mark.parametrize("temperature", [0.0, -0.5, 1.5, float("nan")])
def test_bad_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        split_inverse_temperature(temperature)
    with pytest.raises(TypeError, match="temperature"):
        split_inverse_temperature("0.5")


def test_bad_draw_output_is_refused():
    with pytest.raises(ValueError, match=r"draw\(rows\)"):
        exact_temperature_sample(
            lambda rows: np.zeros((rows.size, 4)), 3, 0.5, np.random.default_rng(0)
        )
    with pytest.raises(ValueError, match=r"draw\(rows\)"):
        adaptive_temperature_sample(
            lambda rows: np.zeros(rows.size, int), 3, 0.5, np.random.default_rng(0)
        )
    with pytest.raises(ValueError, match="candidates"):
        approximate_temperature_sample(np.zeros((3, 4), int), 0.5, np.random.default_rng(0))


def test_split_inverse_temperature():
    assert split_inverse_temperature(1.0) == (1, 0.0)
    assert split_inverse_temperature(1 / 3) == (3, 0.0)
    n, a = split_inverse_temperature(0.7)
    assert n == 1 and a == pytest.approx(1 / 0.7 - 1)


def test_sampling_and_brierlm_import_without_torch():
    """The onnxruntime engine reuses these modules: they must not pull torch in."""
    code = (
        "import sys, model.sampling, model.brierlm, pipeline.bench.sampling; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
