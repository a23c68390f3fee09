"""BrierLM estimators against their closed form 2 P(y) - sum_x P(x)^2, and the evaluation driver
end to end on toy models whose Brier scores are known exactly (fixed seeds; tolerances from the
sample size)."""

import json
import math

import numpy as np
import pytest

from model.brierlm import (
    aggregate_brier,
    brier_lm,
    brier_probability,
    brier_rao_blackwell,
    brier_two_sample,
    evaluate_brier,
    evaluation_positions,
)

# six 3-token outcomes sharing first tokens, so comparing tokens instead of whole rows would show
OUTCOMES = np.array([[1, 2, 3], [1, 2, 4], [1, 5, 3], [2, 2, 3], [2, 5, 5], [6, 6, 6]])
P = np.array([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])
DRAWS = 200_000


def hoeffding(width: float, samples: int, delta: float = 1e-6) -> float:
    """|mean - expectation| bound holding with probability 1 - delta for values in a range `width`."""
    return width * math.sqrt(math.log(2 / delta) / (2 * samples))


def estimates(truth: int):
    rng = np.random.default_rng(truth)
    i1, i2 = rng.choice(P.size, size=(2, DRAWS), p=P)
    x1, x2, y = OUTCOMES[i1], OUTCOMES[i2], np.repeat(OUTCOMES[truth : truth + 1], DRAWS, 0)
    p_true = np.full(DRAWS, P[truth])
    return {
        "two_sample": brier_two_sample(x1, x2, y),
        "probability": brier_probability(p_true, x1, x2),
        "rao_blackwell": brier_rao_blackwell(p_true, P[i1], P[i2]),
    }


@pytest.mark.parametrize("truth", [0, 2, 5])
def test_estimators_match_the_closed_form(truth):
    closed_form = 2 * P[truth] - (P**2).sum()
    found = estimates(truth)
    widths = {"two_sample": 3.0, "probability": 1.0, "rao_blackwell": P.max()}
    for name, values in found.items():
        assert abs(values.mean() - closed_form) < hoeffding(widths[name], DRAWS), name


def test_exact_probability_forms_have_lower_variance():
    found = estimates(1)
    variance = {name: values.var() for name, values in found.items()}
    # with 2e5 draws each variance is known to about 1 %, far below these margins
    assert variance["probability"] < 0.8 * variance["two_sample"]
    assert variance["rao_blackwell"] < 0.1 * variance["probability"]


def test_brier_lm_is_100_times_the_geometric_mean_and_0_without_skill():
    assert brier_lm([1, 1, 1, 1]) == 100.0
    assert brier_lm([0.5, 0.25, 0.125, 0.0625]) == pytest.approx(100 * 0.5**2.5)
    assert brier_lm([0.5, 0.2, 0.0, 0.1]) == 0.0
    assert brier_lm([0.5, -0.01, 0.2, 0.1]) == 0.0
    for bad in ([], [0.5, float("nan")], [[0.5]]):
        with pytest.raises(ValueError, match="briers"):
            brier_lm(bad)


@pytest.mark.parametrize("clustered", [False, True])
def test_standard_errors_match_the_spread_over_repeated_evaluations(clustered):
    rng = np.random.default_rng(0)
    mean, scale = np.array([0.4, 0.2, 0.1, 0.05]), np.array([0.5, 0.4, 0.3, 0.2])
    mixing = np.array([[1, 0, 0, 0], [0.6, 0.8, 0, 0], [0.4, 0.5, 0.77, 0], [0.3, 0.4, 0.5, 0.71]])
    documents = np.repeat(np.arange(100), 20)  # 2000 positions, 20 per document

    def evaluation():  # correlated Brier-1..4 estimates; with a shared effect per document
        noise = rng.standard_normal((2000, 4))
        if clustered:
            noise = 0.6 * noise + 0.8 * rng.standard_normal((100, 4))[documents]
        return aggregate_brier(mean + noise @ mixing.T * scale, documents if clustered else None)

    runs = [evaluation() for _ in range(300)]
    # the spread of 300 runs is known to about 4 %
    spread = np.std([run.brier for run in runs], axis=0)
    reported = np.mean([run.stderr for run in runs], axis=0)
    assert np.allclose(reported / spread, 1, atol=0.15)
    spread = np.std([run.brier_lm for run in runs])
    reported = np.mean([run.brier_lm_stderr for run in runs])
    assert 0.85 < reported / spread < 1.15


class MarkovModel:
    """A first-order Markov chain over tokens: a discrete model with exact n-gram probabilities."""

    def __init__(self, transitions: np.ndarray):
        self.transitions = transitions
        self.cdf = np.cumsum(transitions, axis=1)
        self.cdf[:, -1] = 1.0

    def sample(self, prefixes, n_tokens, seed):
        rng = np.random.default_rng(seed)
        token, out = np.array([p[-1] for p in prefixes]), []
        for _ in range(n_tokens):
            token = (self.cdf[token] < rng.random(token.size)[:, None]).sum(axis=1)
            out.append(token)
        return np.stack(out, axis=1)

    def probability(self, prefixes, continuations):
        previous = np.concatenate([[[p[-1]] for p in prefixes], continuations[:, :-1]], axis=1)
        return np.cumprod(self.transitions[previous, continuations], axis=1)

    def documents(self, count: int, length: int, seed: int) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        starts = [np.array([s]) for s in rng.integers(0, self.transitions.shape[0], count)]
        return [
            np.concatenate([s, row])
            for s, row in zip(starts, self.sample(starts, length - 1, seed))
        ]


@pytest.mark.parametrize("k", [1, 4])
def test_driver_gives_the_closed_form_on_a_markov_model(k):
    rng = np.random.default_rng(1)
    model = MarkovModel(rng.dirichlet(np.full(6, 0.2), size=6))
    truth = MarkovModel(0.85 * model.transitions + 0.15 * rng.dirichlet(np.ones(6), size=6))
    documents = truth.documents(40, 200, seed=2)
    report = evaluate_brier(documents, k, model.sample, model.probability, batch_size=512, seed=3)
    # closed form at each evaluated position: 2 P_model(y) - sum over n-grams of P_model^2
    positions = evaluation_positions([d.size for d in documents], k)
    prefixes = [documents[d][:t] for d, t in positions]
    truths = np.stack([documents[d][t : t + 4] for d, t in positions])
    collision = [np.ones(6)]
    for _ in range(4):
        collision.append((model.transitions**2) @ collision[-1])
    last = np.array([p[-1] for p in prefixes])
    closed_form = 2 * model.probability(prefixes, truths) - np.stack(collision[1:], 1)[last]
    expected = closed_form.mean(axis=0)
    for name, scores in report.estimators.items():
        assert scores.positions == len(positions)
        assert (np.abs(scores.brier - expected) < 4 * scores.stderr).all(), name
        assert abs(scores.brier_lm - brier_lm(expected)) < 4 * scores.brier_lm_stderr, name
    two_sample, rao_blackwell = report.estimators["two_sample"], report.estimators["rao_blackwell"]
    assert (rao_blackwell.stderr < two_sample.stderr).all()


def test_a_perfect_predictor_scores_100():
    v = 7
    permutation = np.eye(v)[(np.arange(v) * 3 + 1) % v]  # next token = 3 * token + 1 mod 7
    model = MarkovModel(permutation)
    report = evaluate_brier(model.documents(5, 30, seed=0), 4, model.sample, model.probability)
    for scores in report.estimators.values():
        assert scores.brier_lm == 100.0 and scores.brier_lm_stderr == 0.0


def test_a_uniform_predictor_over_many_outcomes_scores_near_0():
    v = 1000
    model = MarkovModel(np.full((v, v), 1.0 / v))
    report = evaluate_brier(model.documents(20, 101, seed=0), 4, model.sample, model.probability)
    assert report.estimators["two_sample"].brier_lm < 1.0
    # the Rao-Blackwell form is exact here: 2 v^-n - v^-n at every position
    assert report.estimators["rao_blackwell"].brier_lm == pytest.approx(100 * v**-2.5)


def test_evaluation_positions_are_chunk_boundaries_with_a_whole_4gram_after_them():
    assert evaluation_positions([10, 3, 9, 12], 4).tolist() == [[0, 4], [2, 4], [3, 4], [3, 8]]
    assert evaluation_positions([7], 1, min_context=2).tolist() == [[0, 2], [0, 3]]
    assert evaluation_positions([20], 2, min_context=5).tolist() == [
        [0, 6],
        [0, 8],
        [0, 10],
        [0, 12],
        [0, 14],
        [0, 16],
    ]


def test_driver_subsamples_positions_reproducibly():
    model = MarkovModel(np.random.default_rng(0).dirichlet(np.full(5, 0.2), size=5))
    documents = model.documents(20, 100, seed=1)
    runs = [evaluate_brier(documents, 4, model.sample, max_positions=200, seed=9) for _ in range(2)]
    assert runs[0].estimators.keys() == {"two_sample"}
    assert json.dumps(runs[0].to_dict()) == json.dumps(runs[1].to_dict())
    assert runs[0].estimators["two_sample"].positions == 200
    assert runs[0].estimators["two_sample"].brier_lm > 0


def test_driver_refuses_bad_input():
    model = MarkovModel(np.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match="too short"):
        evaluate_brier([np.array([0, 1, 2])], 1, model.sample)
    with pytest.raises(ValueError, match="integer"):
        evaluate_brier([np.zeros(20)], 1, model.sample)
    with pytest.raises(ValueError, match="sample returned shape"):
        evaluate_brier([np.zeros(20, int)], 1, lambda p, n, s: np.zeros((len(p), n - 1), int))
    with pytest.raises(ValueError, match="outcomes"):
        brier_two_sample(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 4)))
