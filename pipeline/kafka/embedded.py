"""The embedded default: with no Kafka configured, run against a local single-node broker."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.kafka.check import check_kafka
from pipeline.kafka.local_broker import LocalKafka
from pipeline.settings import Settings


@contextmanager
def kafka_or_local(settings: Settings) -> Iterator[Settings]:
    """Yield `settings` as they are when bootstrap servers are set; otherwise start a throwaway
    local broker for the duration and yield a copy of the settings pointed at it. A configured
    Kafka that cannot be used raises KafkaUnavailable before anything starts."""
    if settings.kafka.bootstrap_servers:
        check_kafka(settings.kafka)
        yield settings
        return
    with LocalKafka() as broker:
        kafka = settings.kafka.model_copy(update={"bootstrap_servers": [broker.bootstrap_servers]})
        yield settings.model_copy(update={"kafka": kafka})
