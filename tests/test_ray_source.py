"""A Kafka consumer in a Ray actor hands decoded batches to a slower actor through a bounded queue."""

from __future__ import annotations

import json
import sys
import time

import pytest
import ray
from kafka import KafkaProducer
from ray.util.queue import Empty, Queue

from pipeline.stream.runtime import unpack
from pipeline.stream.source import Batch, KafkaSourceActor

pytestmark = pytest.mark.integration
# Ray workers cannot import test modules: ship this one's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


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
                batch: Batch = unpack(self.inbox.get(timeout=0.5))
            except Empty:
                continue
            time.sleep(self.delay)
            self.seen.extend(event["seq"] for event in batch.decoded)
            self.acks.put(batch.batch_id)
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
        acks,
        decode=json.loads,
        max_records=100,
    )
    consumer = SlowConsumer.options(num_cpus=0.5).remote(inbox, acks, seconds_per_batch=0.05)
    consumed = consumer.run.remote(total)
    stats = ray.get(source.run.remote(max_idle_seconds=3.0))
    result = ray.get(consumed)
    committed = ray.get(source.committed.remote())
    ray.get(source.close.remote())

    assert sorted(result["seen"]) == list(range(total))  # nothing lost, nothing twice
    assert result["max_backlog"] <= queue_bound
    assert stats["paused_seconds"] > 0  # the source really waited on the slow consumer
    assert sum(committed.values()) == total  # every offset committed once acknowledged
