"""A Kafka consumer inside a Ray actor that feeds a bounded queue and commits only acknowledged work.

The source never commits on its own: downstream actors acknowledge each batch once what was derived
from it is durable, and the source commits, per partition, the offset after the longest prefix of
batches that are all acknowledged. When the queue is full the source pauses its partitions (and keeps
polling, so the group does not think it died): a slow model slows consumption instead of growing
memory.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata, TopicPartition
from ray.util.queue import Full, Queue


@dataclass(frozen=True)
class SourceRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


@dataclass(frozen=True)
class Batch:
    """Records polled together, decoded, with the offsets that become committable once acknowledged."""

    batch_id: int
    records: list[SourceRecord]
    decoded: list[Any]
    # (topic, partition) -> offset of the next record to read once this batch is done
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)


def _identity(value: bytes) -> Any:
    return value


@ray.remote
class KafkaSourceActor:
    """Polls `topics` in consumer group `group_id` and puts decoded `Batch`es on `out`."""

    def __init__(
        self,
        topics: list[str],
        group_id: str,
        client_options: dict[str, Any],
        out: Queue,
        acks: Queue,
        decode: Callable[[bytes], Any] = _identity,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
    ) -> None:
        self._consumer = KafkaConsumer(
            *topics,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **client_options,
        )
        self._out, self._acks, self._decode = out, acks, decode
        self._max_records, self._poll_timeout_ms = max_records, poll_timeout_ms
        self._batch_ids = itertools.count()
        self._in_flight: OrderedDict[int, Batch] = OrderedDict()
        self._acked: set[int] = set()
        self.stats = {"records": 0, "batches": 0, "commits": 0, "paused_seconds": 0.0}

    def run(self, max_idle_seconds: float = 5.0, max_records: int | None = None) -> dict[str, Any]:
        """Consume until no record arrived for `max_idle_seconds` (or `max_records` were read),
        then wait for every batch in flight to be acknowledged and commit it."""
        last_record = time.monotonic()
        while time.monotonic() - last_record < max_idle_seconds:
            if max_records is not None and self.stats["records"] >= max_records:
                break
            self._commit_acknowledged()
            polled = self._consumer.poll(timeout_ms=self._poll_timeout_ms, max_records=self._max_records)
            if not polled:
                continue
            last_record = time.monotonic()
            self._hand_over(self._batch(polled))
        self._drain(timeout_seconds=max(60.0, max_idle_seconds))
        return dict(self.stats)

    def close(self) -> None:
        self._consumer.close(autocommit=False)

    def committed(self) -> dict[str, int]:
        """Committed offset per `topic:partition`, as the broker reports it."""
        return {
            f"{tp.topic}:{tp.partition}": self._consumer.committed(tp)
            for tp in sorted(self._consumer.assignment())
        }

    def _batch(self, polled: dict[TopicPartition, list[Any]]) -> Batch:
        records = [
            SourceRecord(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
            for messages in polled.values()
            for m in messages
        ]
        next_offsets = {(tp.topic, tp.partition): messages[-1].offset + 1 for tp, messages in polled.items()}
        self.stats["records"] += len(records)
        self.stats["batches"] += 1
        return Batch(next(self._batch_ids), records, [self._decode(r.value) for r in records], next_offsets)

    def _hand_over(self, batch: Batch) -> None:
        self._in_flight[batch.batch_id] = batch
        paused_at = None
        while True:
            try:
                self._out.put(batch, timeout=self._poll_timeout_ms / 1000)
                break
            except Full:
                # Backpressure: stop fetching but keep the group membership alive.
                if paused_at is None:
                    paused_at = time.monotonic()
                    self._consumer.pause(*self._consumer.assignment())
                self._consumer.poll(timeout_ms=0)
                self._commit_acknowledged()
        if paused_at is not None:
            self._consumer.resume(*self._consumer.paused())
            self.stats["paused_seconds"] += time.monotonic() - paused_at

    def _commit_acknowledged(self) -> None:
        while not self._acks.empty():
            self._acked.add(self._acks.get_nowait())
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        # Only the prefix of batches that are all acknowledged may be committed, in order.
        while self._in_flight and next(iter(self._in_flight)) in self._acked:
            batch_id, batch = self._in_flight.popitem(last=False)
            self._acked.discard(batch_id)
            for (topic, partition), offset in batch.next_offsets.items():
                offsets[TopicPartition(topic, partition)] = OffsetAndMetadata(offset, "", -1)
        if offsets:
            self._consumer.commit(offsets)
            self.stats["commits"] += 1

    def _drain(self, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        while self._in_flight and time.monotonic() < deadline:
            self._commit_acknowledged()
            time.sleep(0.05)
