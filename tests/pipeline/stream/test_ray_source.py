"""A Kafka consumer in a Ray actor hands decoded batches to a slower actor through a bounded queue.

The stage here is the simplest one the source's `Stage` contract allows: each poll becomes one
batch, `(batch_id, decoded values)` (plain data: the source pickles its items, and the actors
cannot import this module), acknowledged by its id."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pytest
import ray
from kafka import KafkaProducer
from kafka.structs import OffsetAndMetadata, TopicPartition
from ray.util.queue import Empty, Queue

from pipeline.stream.source import KafkaSourceActor, SourceRecord, Work
from pipeline.wire import unpack

pytestmark = pytest.mark.integration
# Ray workers cannot import test modules: ship this one's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class BatchStage:
    """Each poll becomes one batch; a partition's safe offset is the first offset of its oldest
    unacknowledged batch, or the next offset to read."""

    def __init__(self, decode: Callable[[bytes], Any]) -> None:
        self._decode = decode
        self._ids = itertools.count()
        # batch id -> first offset per partition, oldest batch first
        self._in_flight: OrderedDict[int, dict[TopicPartition, int]] = OrderedDict()
        self._next: dict[TopicPartition, int] = {}

    def assign(self, tp: TopicPartition, committed: OffsetAndMetadata | None) -> None:
        self._next.pop(tp, None)

    def revoke(self, tp: TopicPartition) -> None:
        self._next.pop(tp, None)
        for firsts in self._in_flight.values():
            firsts.pop(tp, None)

    def process(self, records: list[SourceRecord]) -> Work:
        batch_id = next(self._ids)
        firsts: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            firsts.setdefault(tp, r.offset)
            self._next[tp] = r.offset + 1
        self._in_flight[batch_id] = firsts
        return Work(items=[(batch_id, [self._decode(r.value) for r in records])])

    def end_of_input(self) -> Work:
        return Work()

    def acknowledge(self, batch_id: int) -> None:
        self._in_flight.pop(batch_id, None)

    def commit_points(self) -> dict[TopicPartition, OffsetAndMetadata]:
        points = dict(self._next)
        for firsts in reversed(self._in_flight.values()):  # oldest batch last: it wins
            points.update((tp, offset) for tp, offset in firsts.items() if tp in points)
        return {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in points.items()}

    def pending(self) -> int:
        return len(self._in_flight)

    def stats(self) -> dict[str, Any]:
        return {}


@ray.remote
class SlowConsumer:
    """Takes batches off the queue slower than the source can fill it, acknowledging each one."""

    def __init__(self, inbox: Queue, acks: Queue, seconds_per_batch: float) -> None:
        self.inbox, self.acks, self.delay = inbox, acks, seconds_per_batch
        self.seen: list[int] = []
        self.max_backlog = 0

    def run(self, expected: int, timeout_s: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while len(self.seen) < expected and time.monotonic() < deadline:
            self.max_backlog = max(self.max_backlog, self.inbox.qsize())
            try:
                batch_id, decoded = unpack(self.inbox.get(timeout=0.5))
            except Empty:
                continue
            time.sleep(self.delay)
            self.seen.extend(event["seq"] for event in decoded)
            self.acks.put(batch_id)
        return {"seen": self.seen, "max_backlog": self.max_backlog}


def test_slow_consumer_loses_nothing_and_queue_stays_bounded(
    ray_local, kafka_broker, topic_factory
):
    topic = topic_factory(partitions=3)
    total = 3_000
    producer = KafkaProducer(
        bootstrap_servers=kafka_broker.bootstrap_servers, compression_type="lz4"
    )
    for seq in range(total):
        producer.send(
            topic, key=f"device-{seq % 17}".encode(), value=json.dumps({"seq": seq}).encode()
        )
    producer.flush()
    producer.close()

    queue_bound = 2
    inbox, acks = Queue(maxsize=queue_bound), Queue()
    source = KafkaSourceActor.options(num_cpus=0.5).remote(
        [topic],
        "slow-consumer-test",
        {"bootstrap_servers": kafka_broker.bootstrap_servers},
        inbox,
        BatchStage(json.loads),
        acks,
        max_records=100,
    )
    consumer = SlowConsumer.options(num_cpus=0.5).remote(inbox, acks, seconds_per_batch=0.2)
    consumed = consumer.run.remote(total)
    stats = ray.get(source.run.remote(max_idle_seconds=3.0))
    result = ray.get(consumed)
    committed = ray.get(source.committed.remote())
    ray.get(source.close.remote())

    assert sorted(result["seen"]) == list(range(total))  # nothing lost, nothing twice
    assert result["max_backlog"] <= queue_bound
    assert stats["paused_seconds"] > 0, stats  # the source really waited on the slow consumer
    assert sum(committed.values()) == total  # every offset committed once acknowledged
