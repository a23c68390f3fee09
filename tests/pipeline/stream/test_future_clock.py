"""`future_timestamp` by a chosen clock: the record's Kafka timestamp, the broker's
LogAppendTime, or the consumer's wall clock, with a configurable allowed skew."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from pydantic import ValidationError

from operators.events import from_millis
from operators.windows import WindowSpec
from pipeline.settings import Settings
from pipeline.sim.simulator import simulate
from pipeline.stream.flow import FlowConfig, PartitionFlow
from pipeline.stream.source import CREATE_TIME, LOG_APPEND_TIME, SourceRecord, source_record

HOUR_MS = 3_600_000
FIVE_MINUTES = timedelta(minutes=5)


def reasons(records: list[SourceRecord], clock: str, skew: timedelta = FIVE_MINUTES) -> list:
    """Per record, its dead letter's reason, or None when it was windowed."""
    spec = WindowSpec.from_seconds(300)
    config = FlowConfig(spec, "iot", "txn", "dlq", "late", 1 << 16, 0, clock, skew)
    letters: list = []
    PartitionFlow("iot", 0, config).process(records, [], letters)
    by_offset = {letter.record.offset: letter.reason for letter in letters}
    return [by_offset.get(record.offset) for record in records]


def event_at(ms: int) -> bytes:
    """A valid reading whose event time is `ms`."""
    event = next(iter(simulate("iot", seed=1, entities=1).messages())).event
    return event.model_copy(update={"ts": from_millis(ms)}).model_dump_json().encode()


def record(event_ms: int, timestamp_ms: int, timestamp_type: int = CREATE_TIME) -> SourceRecord:
    return SourceRecord("iot", 0, 0, b"k", event_at(event_ms), timestamp_ms, (), timestamp_type)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_the_default_clock_is_the_records_timestamp_with_five_minutes_of_skew() -> None:
    windows = Settings().windows
    assert (windows.future_timestamp_clock, windows.max_future_skew_seconds) == ("record", 300)
    with pytest.raises(ValidationError):
        Settings(windows={"future_timestamp_clock": "producer"})
    with pytest.raises(ValidationError):
        Settings(windows={"max_future_skew_seconds": -1})


def test_a_producer_whose_clock_runs_an_hour_ahead() -> None:
    """It stamps its events and its records an hour ahead: only the record clock believes it."""
    ahead = now_ms() + HOUR_MS
    skewed = record(ahead, ahead)
    assert reasons([skewed], "record") == [None]
    assert reasons([skewed], "wall") == ["future_timestamp"]
    assert reasons([skewed], "log_append") == ["future_timestamp"]  # CreateTime: the wall clock
    stamped_by_broker = record(ahead, now_ms(), LOG_APPEND_TIME)
    assert reasons([stamped_by_broker], "log_append") == ["future_timestamp"]
    assert reasons([stamped_by_broker], "record") == ["future_timestamp"]


def test_the_allowed_skew_is_a_setting() -> None:
    ten_minutes_ahead = record(1_800_000_600_000, 1_800_000_000_000)
    assert reasons([ten_minutes_ahead], "record") == ["future_timestamp"]
    assert reasons([ten_minutes_ahead], "record", timedelta(minutes=15)) == [None]


def test_the_clocks_on_a_real_broker_create_time_and_log_append_time_topics(kafka_broker) -> None:
    """The same skewed record on a topic that keeps the producer's CreateTime and on one whose
    broker stamps LogAppendTime, read back by a plain consumer and judged by each clock."""
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
    stem = f"clock-{now_ms()}"
    any_time = {"message.timestamp.after.max.ms": str(2**63 - 1)}
    admin.create_topics(
        [
            NewTopic(f"{stem}.create", 1, 1, topic_configs=any_time),
            NewTopic(
                f"{stem}.append", 1, 1, topic_configs={"message.timestamp.type": "LogAppendTime"}
            ),
        ]
    )
    admin.close()
    ahead = now_ms() + HOUR_MS
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    for kind in ("create", "append"):
        producer.send(f"{stem}.{kind}", key=b"k", value=event_at(ahead), timestamp_ms=ahead)
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap_servers)
    read = {}
    for kind in ("create", "append"):
        tp = TopicPartition(f"{stem}.{kind}", 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        while kind not in read:
            for message in consumer.poll(timeout_ms=500).get(tp, []):
                read[kind] = source_record(message)._replace(topic="iot", partition=0)
    consumer.close()

    assert read["create"].timestamp_type == CREATE_TIME
    assert read["append"].timestamp_type == LOG_APPEND_TIME
    assert read["append"].timestamp_ms < ahead  # the broker's own stamp
    assert reasons([read["create"]], "record") == [None]
    assert reasons([read["create"]], "log_append") == ["future_timestamp"]
    assert reasons([read["append"]], "record") == ["future_timestamp"]
    assert reasons([read["append"]], "log_append") == ["future_timestamp"]
    assert reasons([read["append"]], "wall") == ["future_timestamp"]
