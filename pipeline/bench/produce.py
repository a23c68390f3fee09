"""`calm-stream bench produce`: the simulator's produce rate to Kafka against kafka-python's raw produce rate.

Three passes in one run, same count: the simulator alone (no broker), kafka-python sending
pre-built payloads of the simulator's sizes (the ceiling of one Python producer), and the
simulator sending to Kafka as `calm-stream produce` does. Each Kafka pass gets its own fresh
topic, and each rate counts until `flush()` returned, i.e. until the broker acknowledged all.
"""

import itertools
import json
import time
import uuid
from typing import Any, Literal

from kafka.admin import NewTopic

from pipeline.kafka.clients import admin_client
from pipeline.sim.producer import TopicWriter, produce
from pipeline.sim.simulator import Message, simulate


def _raw_rate(
    payloads: list[tuple[bytes, bytes]], topic: str, client_options: dict[str, Any]
) -> float:
    writer = TopicWriter(topic, client_options)
    start = time.perf_counter()
    for key, value in payloads:
        writer.send(key, value)
    writer.close()
    return len(payloads) / (time.perf_counter() - start)


def bench_produce(
    client_options: dict[str, Any],
    count: int = 100_000,
    kind: Literal["iot", "transactions"] = "iot",
    seed: int = 0,
    partitions: int = 4,
) -> dict[str, Any]:
    """Run the three passes against the broker in `client_options`; return the rates."""
    admin = admin_client(client_options)
    topics = [f"bench-produce-{name}-{uuid.uuid4().hex[:8]}" for name in ("raw", "simulator")]
    admin.create_topics([NewTopic(t, partitions, 1) for t in topics])
    try:
        start = time.perf_counter()
        messages: list[Message] = list(itertools.islice(simulate(kind, seed).messages(), count))
        simulator_only = count / (time.perf_counter() - start)
        payloads = [(m.key.encode(), m.value) for m in messages]
        del messages
        raw = _raw_rate(payloads, topics[0], client_options)
        report = produce(
            itertools.islice(simulate(kind, seed).messages(), count),
            TopicWriter(topics[1], client_options),
        )
    finally:
        admin.delete_topics(topics)
        admin.close()
    return {
        "kind": kind,
        "count": count,
        "partitions": partitions,
        "mean_payload_bytes": round(sum(len(v) for _, v in payloads) / count, 1),
        "simulator_only_events_per_s": round(simulator_only),
        "raw_kafka_python_events_per_s": round(raw),
        "simulator_to_kafka_events_per_s": round(report.rate),
        "simulator_to_kafka_vs_raw": round(report.rate / raw, 3),
    }


def print_bench_produce(client_options: dict[str, Any], **options: Any) -> None:
    """The `calm-stream bench produce` body: one JSON object on stdout."""
    print(json.dumps(bench_produce(client_options, **options), indent=2))
