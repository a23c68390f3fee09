"""Reference summaries, prompts and the fact-accuracy metric on simulated windows."""

import random
import re
from datetime import UTC, datetime
from decimal import Decimal

import numpy as np
import pytest

from operators.events import IotReading, Metric, Transaction, from_millis
from operators.facts import ENTITY, NUMBER, extract_facts, reference_facts, score
from operators.prompts import PROMPT_END, render_prompt
from operators.stats import Quantity, iot_stats, median, theil_sen, txn_stats, window_stats
from operators.summaries import summarize
from operators.windows import ClosedWindow, Windower, WindowSpec
from pipeline.sim.corpus import window_stream
from pipeline.sim.simulator import IOT_ANOMALIES, TXN_ANOMALIES, Mess, simulate


@pytest.fixture(scope="module")
def window_stats_list() -> list:
    """Windows of both kinds with every anomaly type, through the real operators."""
    stats = []
    for kind, types, entities in (("iot", IOT_ANOMALIES, 25), ("transactions", TXN_ANOMALIES, 120)):
        sim = simulate(
            kind, 21, entities, {t: 0.08 for t in types}, Mess(reordered=0.05, duplicate=0.02)
        )
        windower = Windower(WindowSpec.from_seconds(300, delay=30, lateness=60))
        for out in window_stream(
            (m.value for m in sim.messages(blocks=16)), windower, datetime.now(UTC)
        ):
            if isinstance(out, ClosedWindow):
                stats.append(window_stats(out.key, out.start_ms, out.end_ms, out.events))
    return stats


def test_fact_accuracy_is_perfect_on_the_references(window_stats_list) -> None:
    types = {a.type for s in window_stats_list for a in s.anomalies}
    assert types == set(IOT_ANOMALIES) | set(TXN_ANOMALIES)
    for stats in window_stats_list:
        summary = summarize(stats)
        assert score(summary, reference_facts(stats)).accuracy == 1.0, summary
        assert summarize(stats) == summary  # deterministic


def _bump(number: str) -> str:
    """Change the last digit of a number as written: 22.1 -> 22.2, 9 -> 8."""
    last = int(number[-1])
    return number[:-1] + str(last + 1 if last < 9 else last - 1)


def test_fact_accuracy_drops_when_one_number_or_the_entity_changes(window_stats_list) -> None:
    rng = random.Random(0)
    for stats in rng.sample(window_stats_list, 200):
        summary, facts = summarize(stats), reference_facts(stats)
        entity = ENTITY.search(summary)
        assert entity is not None and entity.group() == stats.entity
        other = re.sub(
            r"\d+$", lambda m: str(int(m.group()) + 1).zfill(len(m.group())), stats.entity
        )
        changed_entity = summary.replace(stats.entity, other)
        assert score(changed_entity, facts).accuracy < 1.0
        assert f"entity:{stats.entity}" not in extract_facts(changed_entity)
        numbers = list(NUMBER.finditer(ENTITY.sub(lambda m: "x" * len(m.group()), summary)))
        pick = rng.choice(numbers)
        changed_number = summary[: pick.start()] + _bump(pick.group()) + summary[pick.end() :]
        got = score(changed_number, facts)
        assert got.accuracy < 1.0 and got.recall < 1.0 and got.precision < 1.0, changed_number


def test_fact_accuracy_catches_wrong_severity_anomaly_and_invented_facts(window_stats_list) -> None:
    anomalous = next(s for s in window_stats_list if len(s.anomalies) == 1)
    summary, facts = summarize(anomalous), reference_facts(anomalous)
    sev = anomalous.anomalies[0].severity
    other = "low" if sev != "low" else "high"
    assert score(re.sub(rf"\b{sev}\b", other, summary), facts).accuracy < 1.0
    calm = next(s for s in window_stats_list if not s.anomalies)
    assert (
        score(
            summarize(calm) + " A high-severity spike hit the device.", reference_facts(calm)
        ).precision
        < 1.0
    )
    assert score("", facts).accuracy == 0.0
    assert score(summary + " " + summary, facts).accuracy < 1.0  # numbers stated twice count twice


def test_phrasing_varies_between_windows(window_stats_list) -> None:
    shapes = {re.sub(r"\S*\d\S*", "#", summarize(s)).split(".")[0] for s in window_stats_list}
    assert len(shapes) >= 6  # several openings per kind, not one template


def test_prompts_are_compact_and_carry_the_facts(window_stats_list) -> None:
    for stats in window_stats_list:
        prompt = render_prompt(stats)
        assert prompt.endswith(PROMPT_END) and stats.entity in prompt
        for q in [a for a in stats.anomalies for a in a.numbers]:
            assert q.text in prompt
        assert len(prompt.split()) < 70 and len(summarize(stats).split()) < 70


def reading(seq: int, ts_ms: int, value: float) -> IotReading:
    return IotReading(
        device_id="dev-0001",
        site="lab",
        seq=seq,
        ts=from_millis(ts_ms),
        metrics=(Metric(name="temperature", value=value, unit="°C"),),
        firmware="1.0",
        status="ok",
    )


def test_iot_detectors_on_handmade_windows() -> None:
    t = [i * 10_000 for i in range(30)]
    rng = np.random.default_rng(0)
    calm = [reading(i, ts, 20 + rng.normal(0, 0.1)) for i, ts in enumerate(t)]
    assert iot_stats("dev-0001", 0, 300_000, calm).anomalies == ()
    spiky = [
        reading(i, ts, 25.0 if i == 12 else r.metrics[0].value)
        for i, (ts, r) in enumerate(zip(t, calm))
    ]
    [spike] = iot_stats("dev-0001", 0, 300_000, spiky).anomalies
    assert (spike.type, spike.subject, spike.numbers[0].text, spike.severity) == (
        "spike",
        "temperature",
        "25.0",
        "high",
    )
    frozen = round(
        calm[10].metrics[0].value, 2
    )  # the value when the sensor froze, at its resolution
    stuck = [
        reading(i, ts, frozen if i >= 10 else r.metrics[0].value)
        for i, (ts, r) in enumerate(zip(t, calm))
    ]
    [flat] = iot_stats("dev-0001", 0, 300_000, stuck).anomalies
    assert (flat.type, [q.text for q in flat.numbers], flat.severity) == (
        "stuck",
        [f"{frozen:.1f}", "3.2"],
        "medium",
    )
    gap = [r for i, r in enumerate(calm) if not 5 <= i < 20]
    [silence] = iot_stats("dev-0001", 0, 300_000, gap).anomalies
    assert (silence.type, silence.numbers[0].text, silence.severity) == ("dropout", "2.7", "medium")
    ramp = [
        reading(i, ts, r.metrics[0].value + 30 * ts / 3_600_000)
        for i, (ts, r) in enumerate(zip(t, calm))
    ]
    [drift] = iot_stats("dev-0001", 0, 300_000, ramp).anomalies
    assert (drift.type, drift.subject, drift.severity) == ("drift", "temperature", "medium")
    assert abs(float(drift.numbers[0].text) - 30) < 2 and drift.numbers[0].text.startswith("+")


def payment(
    i: int, seconds: float, amount: str, country: str = "DE", channel: str = "pos"
) -> Transaction:
    return Transaction(
        txn_id=f"tx-{i}",
        account_id="acct-00001",
        merchant="Corner Grocer",
        category="grocery",
        amount=Decimal(amount),
        currency="EUR",
        ts=from_millis(int(seconds * 1000)),
        country=country,
        channel=channel,
        card_present=channel == "pos",
    )


def test_payment_detectors_on_handmade_windows() -> None:
    normal = [payment(0, 10, "35.10"), payment(1, 100, "12.00", channel="ecom")]
    stats = txn_stats("acct-00001", 0, 300_000, normal)
    assert stats.anomalies == () and [q.text for q in stats.totals] == ["47.10"]
    testing = normal + [payment(10 + i, 120 + i, "0.99", channel="ecom") for i in range(4)]
    assert [a.type for a in txn_stats("acct-00001", 0, 300_000, testing).anomalies] == [
        "card_testing"
    ]
    burst = normal + [payment(10 + i, 120 + i, "20.00") for i in range(6)]
    [b] = txn_stats("acct-00001", 0, 300_000, burst).anomalies
    assert (b.type, b.numbers[0].text, b.severity) == ("burst", "8", "low")
    travel = [payment(0, 10, "35.10", "DE"), payment(1, 130, "80.00", "US")]
    [g] = txn_stats("acct-00001", 0, 300_000, travel).anomalies
    assert (g.type, g.subject, g.severity, [q.text for q in g.numbers]) == (
        "geo_impossible",
        "DE>US",
        "high",
        ["2.0", "6710"],
    )


def test_median_is_numpys_to_the_bit() -> None:
    # Prompts must not move by one ulp (the model was trained on them): signed zeros, ties, sizes.
    rng = np.random.default_rng(0)
    for n in [*range(1, 40), 435]:
        for a in (rng.normal(size=n), rng.choice([-0.0, 0.0, 1.5, -2.0], size=n)):
            assert repr(median(a)) == repr(float(np.median(a)))


def test_theil_sen_ignores_a_spike_and_quantities_never_print_minus_zero() -> None:
    t = np.linspace(0, 1, 30)
    y = 3 * t + 1
    y[10] = 100
    slope, intercept = theil_sen(t, y)
    assert slope == pytest.approx(3) and intercept == pytest.approx(1)
    assert Quantity(-0.04, 1).text == "0.0" and Quantity(-0.04, 1, signed=True).text == "+0.0"
    assert (
        Quantity(2.25, 1).text == "2.2" and Quantity(1234.5, 0).text == "1234"
    )  # round half to even
