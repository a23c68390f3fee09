"""Send simulated messages to Kafka (or to a file), at a target rate, keyed by entity.

Kafka: kafka-python's `KafkaProducer` (idempotent, acks=all by default in 3.x), key = entity id,
value = the message bytes as the simulator made them (malformed ones included), so the default
partitioner keeps each entity on one partition and its messages in order.
File: JSON Lines, one `{"key": ..., "value": ...}` per message; a value that is not UTF-8 is
written base64-encoded under `value_b64` instead.
"""

import base64
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.kafka import clients
from pipeline.sim.simulator import Message

# Throughput-minded batching; durability stays at kafka-python 3's defaults (idempotent, acks=all).
PRODUCER_TUNING: dict[str, Any] = {"linger_ms": 10, "batch_size": 256 * 1024}


class Writer(Protocol):
    """Where simulated messages go: a topic (`TopicWriter`) or a file (`FileWriter`)."""

    def send(self, key: bytes, value: bytes) -> None: ...

    def close(self) -> None: ...


class TopicWriter:
    """A topic on a broker; send errors are counted and raised at close, never dropped silently."""

    def __init__(self, topic: str, client_options: dict[str, Any], **producer_options: Any):
        self.topic = topic
        self.producer = clients.producer(client_options, **{**PRODUCER_TUNING, **producer_options})
        self.errors: list[BaseException] = []

    def send(self, key: bytes, value: bytes) -> None:
        self.producer.send(self.topic, key=key, value=value).add_errback(self.errors.append)

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()
        if self.errors:
            raise RuntimeError(
                f"{len(self.errors)} messages failed to send; first: {self.errors[0]!r}"
            )


class FileWriter:
    """JSON Lines on disk, for runs without a broker and for replaying into one later."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", encoding="utf-8")

    def send(self, key: bytes, value: bytes) -> None:
        line: dict[str, str] = {"key": key.decode()}
        try:
            line["value"] = value.decode("utf-8")
        except UnicodeDecodeError:
            line["value_b64"] = base64.b64encode(value).decode()
        self.file.write(json.dumps(line, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.file.close()


def read_messages(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) pairs of a file written by `FileWriter`."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            item = json.loads(line)
            value = (
                item["value"].encode() if "value" in item else base64.b64decode(item["value_b64"])
            )
            yield item["key"].encode(), value


@dataclass
class ProduceReport:
    count: int = 0
    seconds: float = 0.0
    tags: Counter = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "seconds": round(self.seconds, 3),
            "events_per_s": round(self.rate, 1),
            "tags": dict(self.tags),
        }


def produce(
    messages: Iterable[Message],
    writer: Writer,
    rate: float | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
) -> ProduceReport:
    """Send every message; with `rate`, pace to that many messages per second. Closes the writer."""
    report = ProduceReport()
    start = time.perf_counter()
    try:
        for message in messages:
            if (
                rate and report.count % 100 == 0
            ):  # pace in steps: sleeping per message costs more than it saves
                ahead = start + report.count / rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            writer.send(message.key.encode(), message.value)
            report.count += 1
            report.tags[message.tag] += 1
            if report.count % 1000 == 0:
                on_progress(1000)
    finally:
        writer.close()  # flush: the rate counts delivered messages, not buffered ones
    report.seconds = time.perf_counter() - start
    on_progress(report.count % 1000)
    return report
