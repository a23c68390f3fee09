"""From Kafka records to inference requests and dead letters, one source partition at a time.

Each assigned partition gets a `PartitionFlow`: decode+validate (operators.decode, by default
with the record's Kafka timestamp as the clock, so a replay decides exactly as the first run did),
event-time windows per entity (operators.windows), and for every window that closes its
statistics rendered as a prompt (operators.stats, operators.prompts). Bad messages and late
events become `DeadLetter`s with their reason.

The flow also knows its commit point: the smallest offset that something not yet durable still
needs — an open window's first record, a closed window or dead letter that the sink has not
acknowledged — or the next offset to read when nothing is held. Next to the offset it records the
watermark the windows had just before that record, committed as offset metadata: a restarted
flow resumes with that watermark, so late events are judged the same on replay and every window
is rebuilt with the same events, hence the same row.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from kafka.structs import OffsetAndMetadata, TopicPartition

from operators.decode import DEFAULT_MAX_FUTURE, DecodeError, decode
from operators.events import from_millis
from operators.facts import reference_facts
from operators.prompts import render_prompt
from operators.stats import window_stats
from operators.windows import ClosedWindow, Rejected, Windower, WindowSpec
from pipeline.kafka.positions import dead_letter_key, decode_watermark, encode_watermark, row_key
from pipeline.stream.source import LOG_APPEND_TIME, SourceRecord, Work

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowRequest:
    """A closed window, rendered, on its way to an inference actor."""

    key: str
    topic: str
    partition: int
    entity: str
    kind: str
    start_ms: int
    end_ms: int
    first_offset: int
    last_offset: int
    events: int
    last_ingested_ms: int  # Kafka timestamp of the window's newest record
    prompt: str
    facts: tuple[str, ...]  # what a faithful summary of the window states (operators.facts)
    origin: int  # index of the source actor waiting for the ack
    closed_at: float  # wall clock when the window closed (queue time starts here)


@dataclass(frozen=True)
class DeadLetter:
    """A record that produced no (complete) window contribution, and why."""

    record: SourceRecord
    reason: str
    field: str | None
    message: str
    routed_to: str  # the DLQ topic or the late topic

    @property
    def key(self) -> str:
        return dead_letter_key(self.record.topic, self.record.partition, self.record.offset)

    @property
    def topic(self) -> str:
        return self.record.topic

    @property
    def partition(self) -> int:
        return self.record.partition


_Held = TypeVar("_Held", WindowRequest, DeadLetter)
_partition_of = operator.attrgetter("topic", "partition")
# The decoder's clock as a datetime; records produced together share their Kafka timestamp.
_clock = functools.lru_cache(maxsize=1)(from_millis)


def judged_at(record: SourceRecord, clock: str) -> int | None:
    """The time (epoch ms) that `record`'s event time may run at most `max_future` ahead of, by
    `windows.future_timestamp_clock`; None when the record has no timestamp. Only "record" gives
    the same answer on a replay; the broker's time is in the record only on a LogAppendTime topic,
    elsewhere "log_append" falls back to the wall clock."""
    if clock == "record" or (clock == "log_append" and record.timestamp_type == LOG_APPEND_TIME):
        return record.timestamp_ms if record.timestamp_ms >= 0 else None
    return time.time_ns() // 1_000_000


def expected_kind(topic: str, iot_topic: str, transactions_topic: str) -> str | None:
    return {iot_topic: "iot", transactions_topic: "transaction"}.get(topic)


@dataclass(frozen=True)
class FlowConfig:
    """What every partition flow of a source shares."""

    spec: WindowSpec
    iot_topic: str
    transactions_topic: str
    dlq_topic: str
    late_topic: str
    max_bytes: int
    origin: int
    clock: str = "record"  # windows.future_timestamp_clock: see `judged_at`
    max_future: timedelta = DEFAULT_MAX_FUTURE


@dataclass
class PartitionFlow:
    """Decode, window and render one partition; track the offsets its outputs still need."""

    topic: str
    partition: int
    config: FlowConfig
    watermark_ms: int | None = None  # restored from the committed offset's metadata
    next_offset: int | None = None
    stats: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.windower = Windower(self.config.spec)
        self.windower.watermark_ms = self.watermark_ms  # late events judged as before the restart
        self.kind = expected_kind(self.topic, self.config.iot_topic, self.config.transactions_topic)
        self._pending: dict[str, int] = {}  # key of an unacknowledged output -> offset it holds
        # offset -> (Kafka timestamp, watermark before the record), from the commit point on
        self._trail: OrderedDict[int, tuple[int, int | None]] = OrderedDict()

    def process(
        self,
        records: Iterable[SourceRecord],
        requests: list[WindowRequest],
        letters: list[DeadLetter],
    ) -> None:
        """Decode and window a run of this partition's records (in offset order), appending the
        windows that closed to `requests` and the dead letters to `letters`. No record stops the
        stream: one that raises anything becomes a dead letter naming the exception's class."""
        trail, windower = self._trail, self.windower
        processed = 0
        for record in records:
            processed += 1
            trail[record.offset] = (record.timestamp_ms, windower.watermark_ms)
            try:
                outputs = self._outputs(record)
            except Exception as error:  # a bug or an input nobody foresaw: the record's alone
                log.warning("%s:%d@%d", self.topic, self.partition, record.offset, exc_info=True)
                outputs = [self._internal_error(record, error)]
            # Held only once the whole record went through: a failure holds nothing back.
            for output in outputs:
                held = self._hold(output)
                (requests if isinstance(held, WindowRequest) else letters).append(held)
        if processed:
            self.stats["processed"] += processed
            self.next_offset = record.offset + 1

    def _outputs(self, record: SourceRecord) -> list[WindowRequest | DeadLetter]:
        """What one record makes: a dead letter, or the windows that its event closed (and the
        event's own dead letter when it is late)."""
        config = self.config
        now_ms = judged_at(record, config.clock)
        event = decode(
            record.value,
            max_bytes=config.max_bytes,
            expected_kind=self.kind,
            now=_clock(now_ms) if now_ms is not None else None,
            max_future=config.max_future,
        )
        if isinstance(event, DecodeError):
            return [
                DeadLetter(record, event.reason.value, event.field, event.message, config.dlq_topic)
            ]
        outputs: list[WindowRequest | DeadLetter] = []
        partition = (self.topic, self.partition)
        for output in self.windower.add(event, partition=partition, offset=record.offset):
            if isinstance(output, ClosedWindow):
                outputs.append(self._request(output))
            elif output.reason == "late":
                outputs.append(self._late(output, record))
            else:
                self.stats["duplicates"] += 1
        return outputs

    def end_of_input(self) -> list[WindowRequest]:
        """The input is over: fire every open window."""
        return [self._hold(self._request(window)) for window in self.windower.flush()]

    def acknowledge(self, key: str) -> None:
        self._pending.pop(key, None)

    def commit_point(self) -> OffsetAndMetadata | None:
        """The offset to commit (with its watermark), or None before the first record."""
        if self.next_offset is None:
            return None
        held = [*self.windower.min_open_offsets().values(), *self._pending.values()]
        offset = min(held, default=self.next_offset)
        while self._trail and next(iter(self._trail)) < offset:
            self._trail.popitem(last=False)
        watermark = self._trail[offset][1] if offset in self._trail else self.windower.watermark_ms
        return OffsetAndMetadata(offset, encode_watermark(watermark), -1)

    @property
    def open_windows(self) -> int:
        return self.windower.open_windows

    def _hold(self, output: _Held) -> _Held:
        """Hold the commit point back at `output`'s first offset until the sink has it."""
        if isinstance(output, WindowRequest):
            self._pending[output.key] = output.first_offset
            self.stats["windows"] += 1
        else:
            self._pending[output.key] = output.record.offset
            self.stats[f"dead_letters.{output.reason}"] += 1
        return output

    def _late(self, rejected: Rejected, record: SourceRecord) -> DeadLetter:
        missed = ", ".join(str(start) for start in rejected.windows)
        message = (
            f"event time {rejected.record.ts_ms} ms is behind the watermark: its window(s) "
            f"starting {missed} ms already closed"
        )
        return DeadLetter(record, "late", "ts", message, self.config.late_topic)

    def _internal_error(self, record: SourceRecord, error: Exception) -> DeadLetter:
        # The class names the failure; its text stays in the log (it may quote the payload).
        name = type(error).__name__
        message = f"{name} while decoding or windowing the record (see the source's log)"
        return DeadLetter(record, f"internal_error:{name}", None, message, self.config.dlq_topic)

    def _request(self, window: ClosedWindow) -> WindowRequest:
        """The window rendered; held (`_pending`) by the caller."""
        first, last = window.offsets[(self.topic, self.partition)]
        key = row_key(self.topic, self.partition, window.start_ms, window.key)
        events = window.events
        stats = window_stats(window.key, window.start_ms, window.end_ms, events)
        return WindowRequest(
            key=key,
            topic=self.topic,
            partition=self.partition,
            entity=window.key,
            kind=events[0].kind,
            start_ms=window.start_ms,
            end_ms=window.end_ms,
            first_offset=first,
            last_offset=last,
            events=len(events),
            last_ingested_ms=self._trail[last][0],
            prompt=render_prompt(stats),
            facts=tuple(sorted(reference_facts(stats).elements())),
            origin=self.config.origin,
            closed_at=time.time(),
        )


class WindowStage:
    """The source actor's stage: one `PartitionFlow` per assigned partition.

    Work handed downstream is one list of `WindowRequest`s per poll; acknowledgements are lists
    of keys the sink made durable.
    """

    def __init__(self, config: FlowConfig) -> None:
        self.config = config
        self.flows: dict[TopicPartition, PartitionFlow] = {}
        self._owner: dict[str, TopicPartition] = {}  # pending key -> its partition
        self.retired = Counter()  # stats of flows given up in rebalances

    def assign(self, tp: TopicPartition, committed: OffsetAndMetadata | None) -> None:
        watermark = decode_watermark(committed.metadata) if committed is not None else None
        self.flows[tp] = PartitionFlow(tp.topic, tp.partition, self.config, watermark)

    def revoke(self, tp: TopicPartition) -> None:
        flow = self.flows.pop(tp, None)
        if flow is not None:
            self.retired.update(flow.stats)
        self._owner = {key: owner for key, owner in self._owner.items() if owner != tp}

    def process(self, records: list[SourceRecord]) -> Work:
        requests: list[WindowRequest] = []
        letters: list[DeadLetter] = []
        # A poll hands over each partition's records in one run: find its flow once per run.
        for (topic, partition), run in itertools.groupby(records, key=_partition_of):
            flow = self.flows.get(TopicPartition(topic, partition))
            if flow is None:  # the partition was revoked after these records were fetched
                continue
            flow.process(run, requests, letters)
        return self._work(requests, letters)

    def end_of_input(self) -> Work:
        return self._work([r for flow in self.flows.values() for r in flow.end_of_input()], [])

    def acknowledge(self, keys: list[str]) -> None:
        for key in keys:
            tp = self._owner.pop(key, None)
            if tp is not None and tp in self.flows:
                self.flows[tp].acknowledge(key)

    def commit_points(self) -> dict[TopicPartition, OffsetAndMetadata]:
        points = {tp: flow.commit_point() for tp, flow in self.flows.items()}
        return {tp: point for tp, point in points.items() if point is not None}

    def stats(self) -> dict[str, Any]:
        totals = Counter(self.retired)
        for flow in self.flows.values():
            totals.update(flow.stats)
        return {**totals, "open_windows": sum(f.open_windows for f in self.flows.values())}

    def pending(self) -> int:
        return len(self._owner)

    def _work(self, requests: list[WindowRequest], letters: list[DeadLetter]) -> Work:
        for item in (*requests, *letters):
            self._owner[item.key] = TopicPartition(item.topic, item.partition)
        return Work(items=[requests] if requests else [], dead_letters=letters)
