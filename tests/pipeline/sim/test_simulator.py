"""The simulator: deterministic, and its injected anomalies and imperfect deliveries come out
of the real operators (decode -> windows -> stats) at the configured rates."""

import itertools
import math
from collections import Counter
from datetime import UTC, datetime

import pytest
import typer
from typer.testing import CliRunner

from operators.decode import DecodeError
from operators.events import event_id
from operators.stats import window_stats
from operators.windows import ClosedWindow, Rejected, Windower, WindowSpec
from pipeline.cli.domain import produce_app
from pipeline.sim.corpus import window_stream
from pipeline.sim.producer import read_messages
from pipeline.sim.simulator import (
    IOT_ANOMALIES,
    TXN_ANOMALIES,
    IotConfig,
    IotSimulator,
    Mess,
    TxnConfig,
    simulate,
)

SPEC = WindowSpec.from_seconds(300, delay=30, lateness=60)  # the pipeline's defaults


def run_operators(
    sim, blocks: int
) -> tuple[list, list[ClosedWindow], list[Rejected], list[DecodeError]]:
    messages = list(sim.messages(blocks=blocks))
    outputs = list(window_stream((m.value for m in messages), Windower(SPEC), datetime.now(UTC)))
    return (
        messages,
        [o for o in outputs if isinstance(o, ClosedWindow)],
        [o for o in outputs if isinstance(o, Rejected)],
        [o for o in outputs if isinstance(o, DecodeError)],
    )


def test_same_seed_same_stream_and_truth() -> None:
    mess = Mess(late=0.02, reordered=0.05, duplicate=0.02, malformed=0.02)
    for kind in ("iot", "transactions"):
        a, b, c = (simulate(kind, seed, mess=mess) for seed in (7, 7, 8))
        first = [(m.key, m.value) for m in itertools.islice(a.messages(), 3000)]
        assert first == [(m.key, m.value) for m in itertools.islice(b.messages(), 3000)]
        assert first != [(m.key, m.value) for m in itertools.islice(c.messages(), 3000)]
        assert a.truth == b.truth != c.truth


@pytest.mark.parametrize(
    ("kind", "types", "entities"),
    [("iot", IOT_ANOMALIES, 40), ("transactions", TXN_ANOMALIES, 150)],
)
def test_anomalies_are_flagged_at_the_configured_rates(
    kind: str, types: tuple[str, ...], entities: int
) -> None:
    rate, blocks = 0.06, 40
    sim = simulate(
        kind,
        seed=11,
        entities=entities,
        anomaly_rates={t: rate for t in types},
        mess=Mess(reordered=0.05, duplicate=0.02),
    )
    _, windows, _, _ = run_operators(sim, blocks)
    flags = {
        (w.key, w.start_ms): {
            a.type for a in window_stats(w.key, w.start_ms, w.end_ms, w.events).anomalies
        }
        for w in windows
    }
    truth = {(a.entity, a.start_ms): a.type for a in sim.truth}
    cells = entities * blocks  # entity-blocks; a block without events has no window and no flag
    sigma = math.sqrt(rate * (1 - rate) / cells)
    for t in types:
        flagged = sum(t in f for f in flags.values())
        assert abs(flagged / cells - rate) < 4 * sigma, (t, flagged, cells)
        injected = {k for k, v in truth.items() if v == t}
        hits = {k for k, f in flags.items() if t in f}
        assert len(injected & hits) >= 0.98 * len(injected), (t, "recall")
        assert len(injected & hits) >= 0.98 * len(hits), (t, "precision")


@pytest.mark.parametrize(("kind", "entities"), [("iot", 30), ("transactions", 400)])
def test_late_duplicate_and_malformed_messages_come_out_as_configured(
    kind: str, entities: int
) -> None:
    mess = Mess(late=0.03, reordered=0.05, duplicate=0.03, malformed=0.03)
    messages, windows, rejected, errors = run_operators(simulate(kind, 3, entities, mess=mess), 24)
    tags = Counter(m.tag for m in messages)
    originals = len(messages) - tags["duplicate"]
    for tag, share in (
        ("late", mess.late),
        ("reordered", mess.reordered),
        ("malformed", mess.malformed),
    ):
        assert abs(tags[tag] / originals - share) < 4 * math.sqrt(
            share * (1 - share) / originals
        ), tag
    # Every malformed message gives exactly the reason it was built to give.
    assert [e.reason for e in errors] == [m.reason for m in messages if m.tag == "malformed"]
    # Late messages (and their copies) are the late events, except those whose delay outlasts the
    # finite stream: they arrive when it ends, before the watermark passed their window.
    end = max(e.ts for e in (m.event for m in messages) if e is not None)
    late_ids = {event_id(m.event) for m in messages if m.tag == "late"}
    surely_late = {
        event_id(m.event)
        for m in messages
        if m.tag == "late" and (end - m.event.ts).total_seconds() >= mess.late_delay_s
    }
    flagged_late = {event_id(r.record.event) for r in rejected if r.reason == "late"}
    assert surely_late <= flagged_late <= late_ids and len(surely_late) > len(late_ids) / 2
    copies = [m for m in messages if m.tag == "duplicate" and event_id(m.event) not in flagged_late]
    assert sum(r.reason == "duplicate" for r in rejected) == len(copies)
    # Nothing else is lost: every other event is in exactly its window.
    in_windows = Counter(event_id(e) for w in windows for e in w.events)
    delivered = {event_id(m.event) for m in messages if m.event is not None} - flagged_late
    assert set(in_windows) == delivered and set(in_windows.values()) == {1}


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="unknown anomaly"):
        simulate("iot", anomaly_rates={"meltdown": 0.1})
    with pytest.raises(ValueError, match="sum to at most 1"):
        simulate("transactions", anomaly_rates={"burst": 0.6, "card_testing": 0.6})
    with pytest.raises(ValueError, match="aligned"):
        IotSimulator(IotConfig(start=datetime(2025, 1, 6, 0, 1, tzinfo=UTC)))
    with pytest.raises(ValueError, match="20 readings"):
        IotSimulator(IotConfig(block_s=60))
    with pytest.raises(ValueError, match="mess shares"):
        Mess(late=0.7, malformed=0.7)
    with pytest.raises(ValueError, match="kind"):
        simulate("weather")  # type: ignore[arg-type]
    assert TxnConfig().anomaly_rates.keys() == set(TXN_ANOMALIES)


def test_produce_to_a_file_writes_the_simulated_stream(tmp_path) -> None:
    app = typer.Typer()
    app.add_typer(produce_app, name="produce")
    out = tmp_path / "iot.jsonl"
    args = [
        "produce",
        "iot",
        "--count",
        "2500",
        "--rate",
        "0",
        "--seed",
        "4",
        "--malformed",
        "0.02",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sent 2500 messages" in result.output and "messages/s" in result.output
    sim = simulate("iot", 4, 50, {t: 0.02 for t in IOT_ANOMALIES}, Mess(malformed=0.02))
    expected = [(m.key.encode(), m.value) for m in itertools.islice(sim.messages(), 2500)]
    assert list(read_messages(out)) == expected
    assert any(
        not value.startswith(b"{") or b"\xff" in value for _, value in expected
    )  # corrupt bytes survive
