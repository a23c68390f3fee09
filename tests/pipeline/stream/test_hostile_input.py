"""What real producers send: no record may stop the stream.

Tombstones (null values), null keys, odd Kafka timestamps, control bytes and JSON garbage each
end as a result (through a window) or as a dead letter with a reason; nothing raises. Fuzzed fast
through the pure per-partition flow, and through the real source on a real broker and Ray.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter

import hypothesis
import pyarrow.compute as pc
import ray
from hypothesis import given
from hypothesis import strategies as st
from kafka import KafkaProducer
from support import (
    CALM_HEADERS,
    INT64_MAX,
    Source,
    committed_offsets,
    create_topics,
    event_with,
    events,
    json_values,
    pipeline_settings,
    read_back,
    read_topic,
    reference_windows,
)

from operators.decode import DecodeError, Reason, decode
from operators.events import to_json_bytes
from operators.windows import WindowSpec
from pipeline.kafka.clients import kafka_client_options
from pipeline.settings import Settings
from pipeline.sim.simulator import simulate
from pipeline.sinks.schemas import DEAD_LETTER_SCHEMA
from pipeline.sinks.sink import ParquetDataset, SinkActor
from pipeline.stream.dlq import DeadLetterWriter, dead_letter_row, send_letter
from pipeline.stream.flow import DeadLetter, FlowConfig, PartitionFlow
from pipeline.stream.job import JobOptions, ensure_topics, run_pipeline
from pipeline.stream.source import SourceRecord, source_record

values = st.one_of(
    st.none(),
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    events.map(to_json_bytes),
    st.builds(event_with, events, st.sampled_from(["ts", "device_id", "merchant"]), json_values),
    # control bytes and odd text inside an otherwise valid event
    st.builds(
        event_with,
        events,
        st.sampled_from(["site", "merchant", "firmware", "ts"]),
        st.text(st.characters(max_codepoint=0x9F), max_size=20),
    ),
    st.sampled_from(
        [b"", b"null", b"{}", b"[]", b"\x00", b"\xff\xfe", b'{"kind":"iot"}\x00', b"\x1b[2J"]
    ),
)
keys = st.none() | st.binary(max_size=64)
# Kafka timestamps: none (-1), anywhere in int64 (overflowing a datetime), or recent.
timestamps = st.one_of(
    st.just(-1),
    st.integers(0, INT64_MAX),
    st.integers(1_600_000_000_000, 1_900_000_000_000),
)
records = st.lists(st.tuples(keys, values, timestamps), max_size=25)


def flow(dlq_topic: str = "dlq") -> PartitionFlow:
    config = FlowConfig(WindowSpec.from_seconds(300), "iot", "txn", dlq_topic, "late", 64 << 10, 0)
    return PartitionFlow("iot", 0, config)


def test_a_tombstone_is_a_dead_letter_not_a_crash() -> None:
    error = decode(None)
    assert isinstance(error, DecodeError) and error.reason is Reason.NULL_VALUE


def test_event_times_a_datetime_cannot_hold_are_invalid_values() -> None:
    event = next(iter(simulate("iot", seed=1, entities=1).messages())).event
    for ts in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "1969-12-31T23:59Z"):
        error = decode(event_with(event, "ts", ts))
        assert isinstance(error, DecodeError)
        assert (error.reason, error.field) == (Reason.INVALID_VALUE, "ts")


@hypothesis.settings(max_examples=3000, deadline=None)
@given(st.none() | st.binary(max_size=300) | values)
def test_decode_never_raises(value: bytes | None) -> None:
    assert isinstance(decode(value), DecodeError) or decode(value).kind in ("iot", "transaction")


@hypothesis.settings(max_examples=1000, deadline=None)
@given(records)
def test_every_record_ends_in_a_window_or_a_dead_letter(batch) -> None:
    """The flow never raises; each record is in one window, one dead letter or a duplicate; once
    everything is acknowledged the commit point is past the last record."""
    partition = flow()
    requests, letters = [], []
    partition.process(
        [SourceRecord("iot", 0, offset, *fields) for offset, fields in enumerate(batch)],
        requests,
        letters,
    )
    requests += partition.end_of_input()
    assert len(batch) == (
        sum(r.events for r in requests) + len(letters) + partition.stats["duplicates"]
    )
    assert len({letter.key for letter in letters}) == len(letters)
    assert all(letter.reason for letter in letters)
    for output in (*requests, *letters):
        partition.acknowledge(output.key)
    if batch:
        assert partition.commit_point().offset == len(batch)


def test_an_unforeseen_exception_is_a_dead_letter_naming_its_class() -> None:
    """A Kafka timestamp beyond what a datetime holds overflows the decoder's clock: the record
    becomes `internal_error:OverflowError`, and the next record is processed."""
    partition, requests, letters = flow(), [], []
    good = next(iter(simulate("iot", seed=2, entities=1).messages()))
    partition.process(
        [
            SourceRecord("iot", 0, 0, None, good.value, INT64_MAX),
            SourceRecord("iot", 0, 1, None, good.value, 1_900_000_000_000),
        ],
        requests,
        letters,
    )
    assert [(letter.record.offset, letter.reason) for letter in letters] == [
        (0, "internal_error:OverflowError")
    ]
    assert partition.open_windows == 1  # the second record was windowed


def produce_records(settings: Settings, batch: list[tuple]) -> None:
    """(key, value, timestamp_ms, headers) records, in order, to the iot topic; -1: the
    producer's clock."""
    producer = KafkaProducer(**kafka_client_options(settings.kafka), max_request_size=4 << 20)
    for key, value, timestamp_ms, headers in batch:
        producer.send(
            settings.kafka.topics.iot,
            key=key,
            value=value,
            headers=headers,
            timestamp_ms=None if timestamp_ms < 0 else timestamp_ms,
        ).get(timeout=30)
    producer.close()


def test_a_tombstone_among_good_events_goes_to_the_dlq_and_the_stream_goes_on(
    ray_local, kafka_broker, tmp_path
):
    settings = pipeline_settings(kafka_broker.bootstrap_servers, tmp_path, None, "tombstone")
    create_topics(settings)
    messages = list(itertools.islice(simulate("iot", seed=5, entities=3).messages(), 120))
    good = [(m.key.encode(), m.value, -1, []) for m in messages]
    good[10] = (None, messages[10].value, -1, [])  # a null key: the event is fine
    hostile = [
        (b"dev-1", None, -1, []),  # a tombstone
        (b"x", messages[4].value, INT64_MAX, [("h", b"\xff")]),  # a timestamp no datetime holds
        (b"y", b"\x00\x01\x02", -1, [("", b"")]),  # control bytes
        (b"z", event_with(messages[0].event, "ts", "0001-01-01T00:00:00+01:00"), -1, []),
    ]
    batch = good[:40] + hostile + good[40:]
    produce_records(settings, batch)

    report = run_pipeline(settings, JobOptions(passthrough=True, until_idle_s=1.0))

    root = tmp_path / "sink"
    results, dlq = read_back(root, "results"), read_back(root, "dlq")
    assert pc.sum(results.column("events")).as_py() == len(good)  # every good event counts
    reasons = dlq.column("reason").to_pylist()
    assert sorted(zip(dlq.column("offset").to_pylist(), reasons)) == [
        (40, "null_value"),
        (41, "internal_error:OverflowError"),
        (42, "malformed_json"),
        (43, "invalid_value"),
    ]
    tombstone = dlq.filter(pc.equal(dlq.column("offset"), 40)).to_pylist()[0]
    assert (tombstone["message_key"], tombstone["value"]) == (b"dev-1", None)
    # The dead-letter topic has them too, the tombstone as a tombstone.
    dlq_topic = read_topic(settings, settings.kafka.topics.dlq)
    assert Counter(dict(r.headers)["calm.error.reason"].decode() for r in dlq_topic) == Counter(
        reasons
    )
    assert [r.key for r in dlq_topic if r.value is None] == [b"dev-1"]
    # The windows equal the operators' own reference over the good records.
    expected, _ = reference_windows(
        settings, settings.kafka.topics.iot, skip={(0, offset) for offset in range(40, 44)}
    )
    assert set(results.column("key").to_pylist()) == set(expected)
    assert report.sources[0]["duplicates"] == 0
    for partition, (committed, end) in committed_offsets(
        settings, settings.kafka.topics.iot
    ).items():
        assert committed == end, f"partition {partition} committed {committed} of {end}"


def odd_records(count: int) -> list[tuple]:
    """Kafka-level oddities crossed with payload garbage and good events: each column cycles
    with its own period, so the combinations vary."""
    messages = simulate("iot", seed=6, entities=4).messages()
    keys = [None, b"", b"k", b"\xff" * 64]
    values = [
        None,
        b"",
        b"\x00",
        b"\xff\xfe",
        b"null",
        b"[]",
        b"\x1b[2J{}",
        b"x" * (70 * 1024),  # over the 64 KiB cap
        lambda event: event_with(event, "site", "ab\x07"),
        lambda event: event_with(event, "ts", "1969-12-31T23:59:59Z"),
        to_json_bytes,
    ]
    timestamps = [-1, 0, INT64_MAX, -1, -1, 1_900_000_000_000, -1]
    headers = [
        [],
        [("", b"")],
        [("h", b"\xff\x00")],
        [("big", b"x" * 100_000)],
        [("d", b"1"), ("d", b"2")],
    ]
    batch = []
    for i in range(count):
        value = values[i % len(values)]
        if callable(value):
            value = value(next(messages).event)
        key = keys[i % 4] if value is not None else b"t"  # kafka-python sends no (None, None)
        batch.append((key, value, timestamps[i % 7], headers[i % 5]))
    return batch


def test_odd_records_through_the_real_source_each_end_in_a_result_or_the_dlq(
    ray_local, kafka_broker, tmp_path
):
    settings = pipeline_settings(kafka_broker.bootstrap_servers, tmp_path, None, "odd")
    create_topics(settings, partitions=2)
    batch = odd_records(385)  # every combination of the periods 4, 11, 7 and 5
    produce_records(settings, batch)

    report = run_pipeline(settings, JobOptions(passthrough=True, until_idle_s=1.0))

    results, dlq = read_back(tmp_path / "sink", "results"), read_back(tmp_path / "sink", "dlq")
    duplicates = sum(s["duplicates"] for s in report.sources)
    reasons = Counter(dlq.column("reason").to_pylist())
    assert pc.sum(results.column("events")).as_py() + dlq.num_rows + duplicates == len(batch)
    assert {"null_value", "too_large", "not_utf8", "internal_error:OverflowError"} <= set(reasons)
    for partition, (committed, end) in committed_offsets(
        settings, settings.kafka.topics.iot
    ).items():
        assert committed == end, f"partition {partition} committed {committed} of {end}"


def test_a_record_with_neither_key_nor_value_reaches_the_dlq_topic(
    ray_local, kafka_broker, tmp_path
):
    """Kafka takes such a record (kafka-python cannot send one, so it is made here as the
    consumer would hand it over); the dead-letter writer must not choke on it."""
    settings = pipeline_settings(kafka_broker.bootstrap_servers, tmp_path, None, "neither")
    source = Source.options(max_concurrency=2).remote()
    sink = SinkActor.remote(str(tmp_path / "sink"), rotate_rows=1, rotate_seconds=3600)
    ray.get(sink.connect.remote([source]))
    ensure_topics(settings, [settings.kafka.topics.dlq])
    letters: list[DeadLetter] = []
    record = SourceRecord("iot", 0, 7, None, None, 1_900_000_000_000, [("n", None), ("u", b"\xff")])
    flow(settings.kafka.topics.dlq).process([record], [], letters)
    [letter] = letters
    writer = DeadLetterWriter(kafka_client_options(settings.kafka), sink, 0)
    writer.send([letter])
    writer.flush()
    assert ray.get(source.wait_for.remote(1)) == [[letter.key]]
    ray.get(sink.close.remote())
    [sent] = read_topic(settings, letter.routed_to)
    assert (sent.key, sent.value) == (b"", None)
    assert sent.headers[:3] == [("n", b""), ("u", b"\xff"), ("calm.error.reason", b"null_value")]
    row = read_back(tmp_path / "sink", "dlq").to_pylist()[0]
    assert (row["message_key"], row["value"], row["reason"]) == (None, None, "null_value")
    assert row["headers"] == [{"key": "n", "value": None}, {"key": "u", "value": b"\xff"}]


# Bad records with odd headers: repeated and empty keys, binary and big values, none at all.
HEADED = [
    (b"k1", b"not json", -1, [("trace-id", b"abc"), ("bin", b"\xff\xfe\x00"), ("trace-id", b"2")]),
    (b"k2", None, -1, []),
    (b"k3", b"{}", -1, [("", b""), ("big", b"x" * 200_000)]),
]


def assert_headers_kept(settings: Settings, root) -> None:
    """The dead-letter topic has each record's headers, then the calm.* ones; `dlq/` has them."""
    dlq_topic = read_topic(settings, settings.kafka.topics.dlq)
    assert len(dlq_topic) == len(HEADED)
    for sent in dlq_topic:
        produced = HEADED[int(dict(sent.headers)["calm.source.offset"])][3]
        assert sent.headers[: len(produced)] == produced
        assert [key for key, _ in sent.headers[len(produced) :]] == CALM_HEADERS
    dlq = read_back(root, "dlq")
    by_offset = dict(zip(dlq.column("offset").to_pylist(), dlq.column("headers").to_pylist()))
    assert by_offset == {
        offset: [{"key": key, "value": value} for key, value in record[3]]
        for offset, record in enumerate(HEADED)
    }


def test_dead_letters_keep_the_producers_headers_beside_calms(ray_local, kafka_broker, tmp_path):
    settings = pipeline_settings(kafka_broker.bootstrap_servers, tmp_path, None, "headers")
    create_topics(settings)
    produce_records(settings, HEADED)
    run_pipeline(settings, JobOptions(passthrough=True, until_idle_s=1.0))
    assert_headers_kept(settings, tmp_path / "sink")


def test_the_headers_a_consumer_reads_reach_the_dlq_topic_and_dataset(kafka_broker, tmp_path):
    """The same without Ray: records read by a plain consumer, the source's conversion, the flow,
    the dead-letter sender on the real broker and the dataset's rows in Parquet."""
    settings = pipeline_settings(kafka_broker.bootstrap_servers, tmp_path, None, "headed")
    create_topics(settings)
    ensure_topics(settings, [settings.kafka.topics.dlq])
    produce_records(settings, HEADED)
    letters: list[DeadLetter] = []
    records = [source_record(m) for m in read_topic(settings, settings.kafka.topics.iot)]
    flow(settings.kafka.topics.dlq).process(records, [], letters)
    producer = KafkaProducer(**kafka_client_options(settings.kafka), max_request_size=4 << 20)
    for letter in letters:
        send_letter(producer, letter).get(timeout=30)
    producer.close()
    dataset = ParquetDataset(tmp_path / "sink" / "dlq", DEAD_LETTER_SCHEMA, "timestamp", "key")
    dataset.add(dead_letter_row(letter) for letter in letters)
    dataset.flush()
    assert_headers_kept(settings, tmp_path / "sink")
