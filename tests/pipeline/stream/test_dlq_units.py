"""Dead letters, no broker: `headers` puts the producer's own headers first (in order, repeats
kept, a null value as empty bytes) and then the `calm.*` ones with the reason and the source
position; `topic_key` handles a null key (and a record with neither key nor value);
`dead_letter_row` keeps the record byte for byte, clamps its timestamp into a datetime, and
matches the sink's `DEAD_LETTER_SCHEMA`."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pytest
from kafka.structs import TopicPartition
from support import CALM_HEADERS, polled

from operators.windows import WindowSpec
from pipeline.sinks.schemas import DEAD_LETTER_SCHEMA
from pipeline.stream.dlq import dead_letter_row, headers, topic_key
from pipeline.stream.flow import DeadLetter, FlowConfig, WindowStage
from pipeline.stream.source import SourceRecord

# pyarrow imports pandas on its first conversion from Python objects (seconds on a loaded
# box): paid here, at import, rather than inside whichever test converts first.
pa.array([0])
T0 = 1_700_000_040_000  # 2023-11-14T22:14:00Z
PRODUCER_HEADERS = (("trace", b"abc"), ("tag", None), ("trace", b"def"))


def record(**where: object) -> SourceRecord:
    fields = {"topic": "txn", "partition": 4, "key": b"acct-9", "headers": PRODUCER_HEADERS}
    return polled(where.pop("value", b"{oops"), where.pop("offset", 1234), T0, **fields | where)


def letter(rec: SourceRecord | None = None, field: str | None = "amount") -> DeadLetter:
    return DeadLetter(rec or record(), "wrong_type", field, "expected a number", "calm.dlq")


def test_the_producers_headers_come_first_then_ours() -> None:
    sent = headers(letter())
    assert sent[:3] == [("trace", b"abc"), ("tag", b""), ("trace", b"def")]
    assert [name for name, _ in sent[3:]] == CALM_HEADERS


def test_our_headers_say_why_and_where_from() -> None:
    ours = dict(headers(letter())[3:])
    assert ours == {
        "calm.error.reason": b"wrong_type",
        "calm.error.field": b"amount",
        "calm.error.message": b"expected a number",
        "calm.source.topic": b"txn",
        "calm.source.partition": b"4",
        "calm.source.offset": b"1234",
    }


def test_no_field_and_no_producer_headers() -> None:
    sent = headers(letter(record(headers=()), field=None))
    assert [name for name, _ in sent] == CALM_HEADERS
    assert dict(sent)["calm.error.field"] == b""
    assert all(isinstance(value, bytes) for _, value in sent)  # kafka-python sends no None


@pytest.mark.parametrize(
    ("key", "value", "sent"),
    [
        (b"acct-9", b"x", b"acct-9"),
        (None, b"x", None),  # Kafka takes a null key with a value: kept null
        (None, None, b""),  # neither: kafka-python would refuse it
        (b"acct-9", None, b"acct-9"),
        (b"", None, b""),
    ],
)
def test_the_topic_key(key, value, sent) -> None:
    assert topic_key(record(key=key, value=value)) == sent


def test_the_row_matches_the_sinks_schema_and_keeps_the_record() -> None:
    values = dead_letter_row(letter())
    assert list(values) == DEAD_LETTER_SCHEMA.names
    table = pa.Table.from_pylist([values], schema=DEAD_LETTER_SCHEMA)
    table.validate(full=True)
    assert table.to_pylist() == [values]
    assert values == {
        "key": "txn/4/1234",
        "topic": "txn",
        "partition": 4,
        "offset": 1234,
        "timestamp": datetime(2023, 11, 14, 22, 14, tzinfo=UTC),
        "message_key": b"acct-9",
        "value": b"{oops",
        "reason": "wrong_type",
        "field": "amount",
        "message": "expected a number",
        "routed_to": "calm.dlq",
        # unlike the topic's headers, the dataset keeps a null header value
        "headers": [
            {"key": "trace", "value": b"abc"},
            {"key": "tag", "value": None},
            {"key": "trace", "value": b"def"},
        ],
    }


def test_a_tombstone_with_a_null_key_keeps_its_nulls_in_the_row() -> None:
    values = dead_letter_row(letter(record(key=None, value=None, headers=()), field=None))
    assert (values["message_key"], values["value"], values["field"]) == (None, None, None)
    assert values["headers"] == []
    pa.Table.from_pylist([values], schema=DEAD_LETTER_SCHEMA).validate(full=True)


@pytest.mark.parametrize(
    ("timestamp_ms", "expected"),
    [
        (-1, datetime(1970, 1, 1, tzinfo=UTC)),  # no timestamp
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        (2**63 - 1, datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)),  # any int64
    ],
)
def test_the_rows_timestamp_is_clamped_into_a_datetime(timestamp_ms, expected) -> None:
    rec = polled(b"x", 0, timestamp_ms)
    values = dead_letter_row(letter(rec))
    assert values["timestamp"] == expected
    pa.Table.from_pylist([values], schema=DEAD_LETTER_SCHEMA).validate(full=True)


def test_a_letter_from_the_window_stage_round_trips() -> None:
    """The stage's own dead letter (a tombstone on the IoT topic) through headers and row."""
    config = FlowConfig(WindowSpec(60_000, 60_000), "iot", "txn", "dlq", "late", 1 << 16, 0)
    stage = WindowStage(config)
    stage.assign(TopicPartition("iot", 0), None)
    [dead] = stage.process([polled(None, 5, T0, headers=(("h", b"1"),))]).dead_letters
    assert headers(dead)[0] == ("h", b"1")
    assert dict(headers(dead))["calm.error.reason"] == b"null_value"
    values = dead_letter_row(dead)
    assert (values["key"], values["reason"], values["routed_to"]) == (
        "iot/0/5",
        "null_value",
        "dlq",
    )
