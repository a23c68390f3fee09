"""Dead letters: to their Kafka topic with the original bytes, and mirrored to the `dlq/` dataset.

A dead letter keeps the record's key, value and headers byte for byte; why it was rejected and
where it came from travel as headers after the producer's own (`calm.error.reason`,
`calm.error.field`, `calm.error.message`, `calm.source.topic`, `calm.source.partition`,
`calm.source.offset`), the convention of Kafka Connect's DLQ. The source flushes the producer before it commits an offset past a dead letter;
the sink acknowledges the Parquet copy like a result row (keyed by topic/partition/offset, so a
replay does not add a second copy there; the topic may receive one, Kafka being at-least-once).
"""

from __future__ import annotations

from typing import Any

import ray
from kafka import KafkaProducer
from kafka.producer.future import FutureRecordMetadata

from operators.events import from_millis
from pipeline.kafka import clients
from pipeline.sinks.sink import Rows
from pipeline.stream.flow import DeadLetter
from pipeline.stream.runtime import cap_in_flight
from pipeline.stream.source import SourceRecord
from pipeline.wire import pack

MAX_WRITES_IN_FLIGHT = 4
# A producer may set any int64 as a record's timestamp; the dataset's time column (and its hour
# partition) holds what a datetime can: from the epoch to 9999-12-31T23:59:59.999.
_LAST_MS = 253_402_300_799_999


def topic_key(record: SourceRecord) -> bytes | None:
    """The key a dead letter goes with: the record's, but kafka-python refuses to send a record
    with neither key nor value (Kafka takes it): such a one goes with an empty key (the
    `dlq/` copy keeps the null)."""
    return b"" if record.key is None and record.value is None else record.key


def send_letter(producer: KafkaProducer, letter: DeadLetter) -> FutureRecordMetadata:
    """Send one dead letter to its topic: the record's key, value and headers, then ours."""
    record = letter.record
    return producer.send(
        letter.routed_to, key=topic_key(record), value=record.value, headers=headers(letter)
    )


def headers(letter: DeadLetter) -> list[tuple[str, bytes]]:
    """The producer's own headers, then why and where from (Kafka Connect's DLQ convention). A
    null header value goes as empty bytes: kafka-python cannot send one (`dlq/` keeps the null)."""
    record = letter.record
    return [
        *((key, b"" if value is None else value) for key, value in record.headers),
        ("calm.error.reason", letter.reason.encode()),
        ("calm.error.field", (letter.field or "").encode()),
        ("calm.error.message", letter.message.encode()),
        ("calm.source.topic", record.topic.encode()),
        ("calm.source.partition", str(record.partition).encode()),
        ("calm.source.offset", str(record.offset).encode()),
    ]


def dead_letter_row(letter: DeadLetter) -> dict[str, Any]:
    record = letter.record
    return {
        "key": letter.key,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": from_millis(min(max(record.timestamp_ms, 0), _LAST_MS)),
        "message_key": record.key,
        "value": record.value,
        "reason": letter.reason,
        "field": letter.field,
        "message": letter.message,
        "routed_to": letter.routed_to,
        "headers": [{"key": key, "value": value} for key, value in record.headers],
    }


class DeadLetterWriter:
    """Built inside a source actor (a producer does not travel between processes)."""

    def __init__(
        self, client_options: dict[str, Any], sink: ray.actor.ActorHandle, origin: int
    ) -> None:
        self._producer = clients.producer(client_options, acks="all", linger_ms=5)
        self._sink, self._origin = sink, origin
        self._errors: list[BaseException] = []
        self._writes: list[ray.ObjectRef] = []

    def send(self, letters: list[DeadLetter]) -> None:
        for letter in letters:
            send_letter(self._producer, letter).add_errback(self._errors.append)
        rows = Rows(dead_letters=[(self._origin, dead_letter_row(letter)) for letter in letters])
        self._writes.append(self._sink.write.remote(pack(rows)))
        # bounded: a flood of bad input waits here
        self._writes = cap_in_flight(self._writes, MAX_WRITES_IN_FLIGHT)

    def flush(self, timeout_ms: int | None = None) -> None:
        """Block until every dead letter sent so far is acknowledged by its topic; raises
        KafkaTimeoutError when that takes longer than `timeout_ms`."""
        self._producer.flush(None if timeout_ms is None else timeout_ms / 1000)
        if self._errors:
            raise RuntimeError(
                f"{len(self._errors)} dead letters could not be sent; first: {self._errors[0]!r}"
            )
