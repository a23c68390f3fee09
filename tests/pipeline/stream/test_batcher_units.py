"""The inference actors' `Batcher` as a list-in/list-out operator: requests with their token costs
in, batches out, in arrival order. Checks the token budget (a batch never exceeds it unless one
request alone does, and then goes alone), that batches cut in order without reordering, and the
latency target, with time driven through the `now` the batcher is given (no sleeps)."""

from __future__ import annotations

import pytest

from pipeline.stream.inference import Batcher


def batcher(budget: int = 10, latency_s: float = 0.05) -> Batcher[str]:
    return Batcher(budget, latency_s)


def fill(b: Batcher[str], costs: list[int], now: float = 0.0) -> None:
    for i, cost in enumerate(costs):
        b.add(f"r{i}", cost, now)


def drain(b: Batcher[str]) -> list[list[str]]:
    batches = []
    while len(b):
        batches.append(b.take())
    return batches


def test_a_batch_takes_the_oldest_requests_that_fit_the_budget() -> None:
    b = batcher(budget=10)
    fill(b, [4, 4, 4])
    assert b.full()
    assert b.take() == ["r0", "r1"]  # 8; a third would make 12
    assert len(b) == 1 and not b.full()
    assert b.take() == ["r2"] and len(b) == 0


def test_a_request_over_the_budget_goes_alone() -> None:
    b = batcher(budget=10)
    fill(b, [3, 25, 2])
    assert drain(b) == [["r0"], ["r1"], ["r2"]]


def test_the_budget_is_filled_exactly() -> None:
    b = batcher(budget=10)
    fill(b, [5, 5, 1])
    assert b.take() == ["r0", "r1"]


def test_full_means_the_waiting_cost_reaches_the_budget() -> None:
    b = batcher(budget=10)
    fill(b, [9])
    assert not b.full()
    b.add("r1", 1, 0.0)
    assert b.full()


def test_batches_do_not_skip_ahead_to_a_smaller_request() -> None:
    """FIFO: a request that does not fit ends the batch, even if a later one would."""
    b = batcher(budget=10)
    fill(b, [6, 6, 1])
    assert drain(b) == [["r0"], ["r1", "r2"]]


@pytest.mark.parametrize(
    "costs", [[1] * 25, [3, 7, 2, 9, 9, 1, 10, 4], [11, 1, 11], [10, 10, 10], [5]]
)
def test_batches_partition_the_requests_in_order_within_the_budget(costs) -> None:
    b = batcher(budget=10)
    fill(b, costs)
    batches = drain(b)
    assert [r for batch in batches for r in batch] == [f"r{i}" for i in range(len(costs))]
    cost = dict(zip((f"r{i}" for i in range(len(costs))), costs))
    for batch in batches:
        assert len(batch) == 1 or sum(cost[r] for r in batch) <= 10
    assert not b.full() and b.take() == []


def test_an_empty_batcher_is_never_ready_and_waits_the_whole_target() -> None:
    b = batcher(latency_s=0.05)
    assert not b.ready(1e9) and not b.full()
    assert b.seconds_left(123.0) == 0.05
    assert b.take() == []


def test_the_latency_target_runs_from_the_oldest_request() -> None:
    # Times are binary fractions, so the boundary is exact: ready at the target, not before.
    b = batcher(budget=1_000, latency_s=0.25)
    b.add("first", 1, now=10.0)
    b.add("second", 1, now=10.125)
    assert not b.ready(10.2421875)
    assert b.seconds_left(10.125) == 0.125
    assert b.ready(10.25) and b.seconds_left(10.25) == 0.0
    assert b.seconds_left(11.0) == 0.0  # never negative
    assert b.take() == ["first", "second"]


def test_after_a_batch_the_clock_runs_from_the_next_oldest() -> None:
    b = batcher(budget=4, latency_s=0.25)
    b.add("a", 2, now=0.0)
    b.add("b", 3, now=0.125)
    assert b.ready(0.0)  # full: no need to wait
    assert b.take() == ["a"]
    assert not b.full() and not b.ready(0.25)  # "b" has waited half its target
    assert b.seconds_left(0.25) == 0.125
    assert b.ready(0.375)


def test_a_batcher_emptied_restarts_its_clock_with_the_next_request() -> None:
    b = batcher(budget=10, latency_s=0.25)
    b.add("a", 3, now=0.0)
    assert b.take() == ["a"]
    b.add("b", 3, now=1.0)
    assert not b.ready(1.125) and b.seconds_left(1.125) == 0.125
    assert b.ready(1.25)
