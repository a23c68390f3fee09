"""The window stage as a list-in/list-out operator, no broker: polled records in, `Work` (one list
of window requests per poll, and dead letters) out. Checks that a window closes exactly when the
watermark reaches its end, one window per entity, a malformed or late record becomes a dead letter
with its reason, commit points stay behind open and unacknowledged outputs and carry the
watermark as offset metadata, row and dead-letter keys round-trip, and revoke drops a partition."""

from __future__ import annotations

import pytest
from kafka.structs import OffsetAndMetadata, TopicPartition
from support import iot_bytes, polled, reading, transaction_bytes

from operators.windows import WindowSpec
from pipeline.kafka.positions import (
    dead_letter_key,
    dead_letter_key_position,
    decode_watermark,
    encode_watermark,
    row_key,
    row_key_position,
)
from pipeline.stream.flow import DeadLetter, FlowConfig, WindowRequest, WindowStage

MINUTE = 60_000
T0 = 1_700_000_040_000  # a multiple of a minute: windows start at T0, T0 + MINUTE, ...
CONFIG = FlowConfig(WindowSpec(MINUTE, MINUTE), "iot", "txn", "dlq", "late", 1 << 16, origin=3)
P0, P1 = TopicPartition("iot", 0), TopicPartition("iot", 1)


def stage(*partitions: TopicPartition, committed: OffsetAndMetadata | None = None) -> WindowStage:
    s = WindowStage(CONFIG)
    for tp in partitions or (P0,):
        s.assign(tp, committed)
    return s


def requests(work) -> list[WindowRequest]:
    """The window requests of one `Work` (at most one list per poll)."""
    assert len(work.items) <= 1
    return [r for batch in work.items for r in batch]


def point(s: WindowStage, tp: TopicPartition = P0) -> tuple[int, int | None]:
    """The commit offset of `tp` and the watermark in its metadata."""
    committed = s.commit_points()[tp]
    return committed.offset, decode_watermark(committed.metadata)


def test_a_window_closes_when_the_watermark_reaches_its_end() -> None:
    s = stage()
    opened = s.process([reading("dev-1", i, T0 + 20_000 * i, offset=i) for i in range(3)])
    assert opened.items == [] and opened.dead_letters == []
    assert s.process([reading("dev-1", 3, T0 + MINUTE - 1, offset=3)]).items == []
    work = s.process([reading("dev-1", 4, T0 + MINUTE, offset=4)])
    [window] = requests(work)
    assert window.key == row_key("iot", 0, T0, "dev-1")
    assert (window.topic, window.partition, window.entity, window.kind) == (
        "iot",
        0,
        "dev-1",
        "iot",
    )
    assert (window.start_ms, window.end_ms) == (T0, T0 + MINUTE)
    assert (window.first_offset, window.last_offset, window.events) == (0, 3, 4)
    assert window.last_ingested_ms == T0 + MINUTE - 1  # the Kafka timestamp of offset 3
    assert window.origin == 3 and window.prompt and "entity:dev-1" in window.facts
    assert s.stats()["open_windows"] == 1  # the new minute, holding offset 4


def test_each_entity_gets_its_own_window() -> None:
    s = stage()
    devices = ["dev-1", "dev-2", "dev-1", "dev-1", "dev-2"]
    s.process([reading(d, i, T0 + 1_000 * i, offset=i) for i, d in enumerate(devices)])
    assert s.stats()["open_windows"] == 2
    closed = requests(s.process([reading("dev-3", 0, T0 + MINUTE, offset=5)]))
    by_entity = {r.entity: (r.events, r.first_offset, r.last_offset, r.key) for r in closed}
    assert by_entity == {
        "dev-1": (3, 0, 3, row_key("iot", 0, T0, "dev-1")),
        "dev-2": (2, 1, 4, row_key("iot", 0, T0, "dev-2")),
    }


def test_end_of_input_fires_every_open_window() -> None:
    s = stage(P0, P1)
    s.process([reading("dev-1", 0, T0, 0), reading("dev-2", 0, T0 + MINUTE, 0, partition=1)])
    fired = requests(s.end_of_input())
    assert sorted((r.partition, r.entity, r.start_ms) for r in fired) == [
        (0, "dev-1", T0),
        (1, "dev-2", T0 + MINUTE),
    ]
    assert s.stats()["open_windows"] == 0


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "null_value"),
        (b"", "empty"),
        (b"\xff\xfe", "not_utf8"),
        (b'{"kind": "iot", ', "malformed_json"),
        (b"[1, 2]", "not_object"),
        (transaction_bytes("t-1", "acct-1", T0), "unexpected_kind"),  # a payment on the IoT topic
        (iot_bytes("dev-1", 0, T0 + 3_600_000), "future_timestamp"),  # an hour past its timestamp
    ],
)
def test_a_malformed_record_becomes_a_dead_letter_with_its_reason(value, reason) -> None:
    s = stage()
    bad = polled(value, 7, T0)
    work = s.process([reading("dev-1", 0, T0, 6), bad])
    assert work.items == []
    [letter] = work.dead_letters
    assert isinstance(letter, DeadLetter) and letter.record is bad
    assert (letter.reason, letter.routed_to, letter.key) == (reason, "dlq", "iot/0/7")
    assert letter.message
    assert s.stats()[f"dead_letters.{reason}"] == 1 and s.stats()["processed"] == 2


def test_a_late_event_goes_to_the_late_topic_and_the_rest_flows_on() -> None:
    s = stage()
    s.process([reading("dev-1", 0, T0, 0)])
    [closed] = requests(s.process([reading("dev-1", 1, T0 + MINUTE, 1)]))
    work = s.process([reading("dev-1", 2, T0 + 5_000, 2)])  # behind the watermark
    [letter] = work.dead_letters
    assert (letter.reason, letter.field, letter.routed_to) == ("late", "ts", "late")
    assert str(T0) in letter.message and work.items == []
    assert closed.events == 1  # the late event never joins the window that already fired


def test_a_duplicate_is_counted_not_windowed() -> None:
    s = stage()
    s.process([reading("dev-1", 0, T0, 0), reading("dev-1", 0, T0, 1)])  # re-delivered copy
    [window] = requests(s.process([reading("dev-1", 1, T0 + MINUTE, 2)]))
    assert window.events == 1 and s.stats()["duplicates"] == 1


def test_nothing_to_commit_before_the_first_record() -> None:
    assert stage().commit_points() == {}


def test_the_commit_point_holds_back_until_the_window_is_acknowledged() -> None:
    s = stage()
    s.process([reading("dev-1", i, T0 + 10_000 * i, offset=10 + i) for i in range(3)])
    assert point(s) == (10, None)  # the open window needs offset 10; no watermark before it
    [window] = requests(s.process([reading("dev-1", 3, T0 + MINUTE, offset=13)]))
    assert point(s) == (10, None)  # closed but not durable yet
    assert s.pending() == 1
    s.acknowledge([window.key])
    # Held now by the new minute's window at offset 13, whose record came at watermark T0 + 20 s.
    assert point(s) == (13, T0 + 20_000) and s.pending() == 0


def test_the_commit_point_passes_an_acknowledged_dead_letter() -> None:
    s = stage()
    [letter] = s.process([polled(b"garbage", 0, T0)]).dead_letters
    assert point(s) == (0, None)
    s.acknowledge([letter.key, "iot/0/999"])  # an unknown key is ignored
    assert point(s) == (1, None)  # nothing held: the next offset to read


def test_the_committed_watermark_is_restored_on_assign() -> None:
    """A restart resumes with the watermark committed beside the offset: the same old event is
    judged late again, while a fresh group (no metadata) takes it into a window."""
    event = reading("dev-1", 0, T0, 40)
    committed = OffsetAndMetadata(40, encode_watermark(T0 + MINUTE), -1)
    [letter] = stage(committed=committed).process([event]).dead_letters
    assert letter.reason == "late"
    fresh = stage(committed=OffsetAndMetadata(40, "", -1))
    assert fresh.process([event]).dead_letters == [] and fresh.stats()["open_windows"] == 1


@pytest.mark.parametrize("watermark", [None, 0, T0, 2**62])
def test_a_watermark_round_trips_through_commit_metadata(watermark) -> None:
    encoded = encode_watermark(watermark)
    assert isinstance(encoded, str) and decode_watermark(encoded) == watermark


@pytest.mark.parametrize(
    "metadata", [None, "", "{}", "not json", "[1]", '"x"', '{"watermark_ms": "5"}', '{"w": 1}']
)
def test_foreign_commit_metadata_means_no_watermark(metadata) -> None:
    assert decode_watermark(metadata) is None


@pytest.mark.parametrize(
    ("topic", "partition", "start_ms", "entity"),
    [("iot", 0, 0, "dev-1"), ("corp.iot-readings_v2", 37, T0, "acct:9.A-b_c")],
)
def test_row_keys_round_trip(topic, partition, start_ms, entity) -> None:
    key = row_key(topic, partition, start_ms, entity)
    assert row_key_position(key) == ((topic, partition), start_ms)
    assert key.endswith("/" + entity)
    assert dead_letter_key_position(dead_letter_key(topic, partition, start_ms)) == (
        (topic, partition),
        start_ms,
    )


def test_records_of_two_partitions_in_one_poll_go_to_their_own_flows() -> None:
    s = stage(P0, P1)
    s.process([reading("dev-1", 0, T0, 5), reading("dev-1", 1, T0 + MINUTE, 8, partition=1)])
    # Partition 1's watermark closing its own windows does not close partition 0's.
    assert point(s, P0) == (5, None) and point(s, P1) == (8, None)
    assert s.stats()["open_windows"] == 2


def test_revoke_drops_the_partitions_state() -> None:
    s = stage(P0, P1)
    s.process([reading("dev-1", 0, T0, 0), reading("dev-2", 0, T0, 0, partition=1)])
    work = s.process(
        [reading("dev-1", 1, T0 + MINUTE, 1), reading("dev-2", 1, T0 + MINUTE, 1, partition=1)]
    )
    assert s.pending() == 2
    s.revoke(P0)
    assert set(s.commit_points()) == {P1} and s.pending() == 1
    assert s.process([reading("dev-1", 2, T0 + 2 * MINUTE, 2)]).items == []  # fetched before
    s.acknowledge([r.key for r in requests(work)])  # the revoked key is ignored
    assert point(s, P1) == (1, T0) and s.stats()["processed"] == 4  # retired stats kept
    assert s.stats()["open_windows"] == 1
