"""How input positions are named where they leave a source: a partition's name in snapshots and
metrics (`topic:partition`), the deterministic keys of result rows and dead letters (and the
source position each key stands for), and the watermark committed as offset metadata.

The sources write these names, the sink reads them back to forget the keys a replay can no
longer write: both sides import them from here.
"""

from __future__ import annotations

import json

from kafka.structs import TopicPartition


def partition_name(tp: TopicPartition) -> str:
    """How snapshots name a partition: `topic:partition` (topic names have no ':')."""
    return f"{tp.topic}:{tp.partition}"


def parse_partition_name(name: str) -> tuple[str, int]:
    topic, partition = name.rsplit(":", 1)
    return topic, int(partition)


def row_key(topic: str, partition: int, start_ms: int, entity: str) -> str:
    """The deterministic key of a result row: (source topic, partition, window, entity)."""
    return f"{topic}/{partition}/{start_ms}/{entity}"


def dead_letter_key(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


# Topic names and entity ids never contain "/" (Kafka's and operators.events' alphabets).
def row_key_position(key: str) -> tuple[tuple[str, int], int]:
    """A `row_key`'s source partition and window start."""
    topic, partition, start_ms, _ = key.split("/", 3)
    return (topic, int(partition)), int(start_ms)


def dead_letter_key_position(key: str) -> tuple[tuple[str, int], int]:
    """A `dead_letter_key`'s source partition and offset."""
    topic, partition, offset = key.split("/")
    return (topic, int(partition)), int(offset)


def encode_watermark(watermark_ms: int | None) -> str:
    return "" if watermark_ms is None else json.dumps({"watermark_ms": watermark_ms})


def decode_watermark(metadata: str | None) -> int | None:
    """The watermark stored with a committed offset; None for a fresh group or foreign metadata."""
    try:
        value = json.loads(metadata or "{}").get("watermark_ms")
    except (json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, int) else None
