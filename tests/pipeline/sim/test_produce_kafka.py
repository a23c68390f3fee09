"""Producing simulated events to a real broker and consuming them back (integration)."""

import itertools
import time
from collections import Counter, defaultdict

from kafka import KafkaConsumer, TopicPartition

from operators.decode import decode
from pipeline.kafka.clients import kafka_client_options
from pipeline.settings import KafkaSettings
from pipeline.sim.producer import TopicWriter, produce
from pipeline.sim.simulator import Mess, simulate

COUNT = 100_000
PARTITIONS = 4


def consume_all(
    bootstrap: str, topic: str, count: int, timeout_s: float = 180
) -> dict[int, list[tuple[bytes, bytes]]]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_poll_records=5000,
        fetch_max_bytes=16 * 1024 * 1024,
    )
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    received: dict[int, list[tuple[bytes, bytes]]] = defaultdict(list)
    deadline = time.monotonic() + timeout_s
    while sum(map(len, received.values())) < count and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=1000).items():
            received[tp.partition] += [(r.key, r.value) for r in records]
    consumer.close()
    return received


def test_100k_events_round_trip_through_the_broker(kafka_broker, topic_factory) -> None:
    topic = topic_factory(partitions=PARTITIONS)
    options = kafka_client_options(
        KafkaSettings(bootstrap_servers=[kafka_broker.bootstrap_servers])
    )
    mess = Mess(late=0.01, reordered=0.02, duplicate=0.01, malformed=0.01)
    sent = list(
        itertools.islice(simulate("transactions", 9, 500, mess=mess).messages(), COUNT // 2)
    )
    sent += list(itertools.islice(simulate("iot", 9, 100, mess=mess).messages(), COUNT - len(sent)))
    report = produce(iter(sent), TopicWriter(topic, options))
    assert report.count == COUNT

    received = consume_all(kafka_broker.bootstrap_servers, topic, COUNT)
    assert sum(map(len, received.values())) == COUNT
    partition_of = {key: p for p, records in received.items() for key, _ in records}
    keys_per_partition = Counter(partition_of.values())
    assert len(keys_per_partition) == PARTITIONS  # the keys spread over all partitions ...
    assert sum(keys_per_partition.values()) == len(
        {m.key for m in sent}
    )  # ... each key on exactly one
    for partition, records in received.items():
        mine = [m for m in sent if partition_of[m.key.encode()] == partition]
        assert records == [
            (m.key.encode(), m.value) for m in mine
        ]  # same keys and bytes, same order
        events = [(m.event, value) for m, (_, value) in zip(mine, records) if m.event is not None]
        assert all(decode(value) == event for event, value in events)  # the same events come back
