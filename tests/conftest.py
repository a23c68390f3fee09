"""Session fixtures for tests against real services: a local Apache Kafka broker, topics per test.

A test that uses one of SERVICE_FIXTURES is marked `integration` automatically.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator

import pytest
from kafka.admin import KafkaAdminClient

from pipeline.kafka.local_broker import LocalKafka, SaslUser
from pipeline.settings import RaySettings
from pipeline.stream.runtime import init_ray

# Ray waits 30 s for a new node's raylet by default: too short on a loaded 2-core CI box. The
# pipeline processes that tests start inherit this too.
os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")

SERVICE_FIXTURES = {"kafka_broker", "sasl_kafka_broker", "topic_factory", "ray_local"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[LocalKafka]:
    """One real broker (PLAINTEXT on a free loopback port) for the whole test session."""
    with LocalKafka() as broker:
        yield broker


@pytest.fixture(scope="session")
def sasl_kafka_broker() -> Iterator[LocalKafka]:
    """A second broker with a SASL_PLAINTEXT listener (PLAIN and SCRAM-SHA-256) for one user,
    `.sasl`; started only when a test asks for it."""
    with LocalKafka(sasl=SaslUser("calm-test", "calm-test-secret")) as broker:
        yield broker


@pytest.fixture
def topic_factory(
    kafka_broker: LocalKafka, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """make(partitions=1) creates a topic named after the test plus a random suffix."""
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap_servers)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:100]

    def make(partitions: int = 1) -> str:
        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1}}, wait_for_metadata=True
        )
        return name

    yield make
    admin.close()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray sized for a 2-core, 24 GiB CI box: 2 CPUs, a 512 MiB object store."""
    import ray

    init_ray(RaySettings(num_cpus=2, object_store_memory_mb=512))
    yield
    ray.shutdown()
