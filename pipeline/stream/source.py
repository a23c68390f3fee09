"""Kafka consumers inside Ray actors that feed a bounded queue and commit only durable work.

A `KafkaSourceActor` polls its share of the partitions of a consumer group and hands what a
`Stage` makes of the records to a bounded `ray.util.queue.Queue`. The source never commits on its
own judgement: downstream actors acknowledge work (by calling `acknowledge`, or through an acks
queue) once what was derived from it is durable, and the stage says, per partition, which offset
is safe to commit (with metadata to resume from). When the queue is full the source pauses its
partitions and keeps polling, so the group does not think it died: a slow consumer slows
consumption instead of growing memory.

A broker that goes away is waited for: requests that fail for want of one are retried, and an
idle consumer asks for its partitions' end offsets now and then to notice; the `BrokerWatch` ends
the run once no broker has answered for `kafka.reconnect_timeout_seconds`. Nothing is committed
meanwhile, so nothing is lost or repeated whether the broker comes back or not.

Rebalances: a revoked partition's safe offset is committed before it is given up (the listener
runs on kafka-python's IO thread and awaits the commit); a newly assigned partition is handed to
the stage, with its committed offset and metadata, before its first records are processed.

The stage is `pipeline.stream.flow.WindowStage` (decode, validate, window, render) in the
streaming job; `Stage` below is its contract.

The commit protocol (`_commit`, every `commit_interval_s`, and once more when draining). Each step
is marked "commit step N" on the lines that do it:

1. Read the sink's acks: the keys whose rows (or dead letters) are durable in the sink, fsynced
   and renamed, reach the stage (`Stage.acknowledge`) and stop holding their offsets.
2. Ask the stage for its commit points: per partition, the first offset an open window or an
   unacknowledged key still needs, with the watermark to resume from as metadata
   (`pipeline.kafka.positions.encode_watermark`). Only points past the last commit go on.
3. Flush the dead-letter producer: the dead letters below those offsets must be in their topic.
   If no broker answers, nothing is committed this time.
4. Commit the offsets with their metadata to the group coordinator, and remember them.
5. Report them to the sink (`report` -> `SinkActor.observe_source`), which forgets the keys no
   replay from those offsets can write again (`Datasets.forget_committed`).

A crash between any two steps loses nothing: the group replays from the last commit, the sink
drops the keys it already holds, and a replayed window gives the byte-identical row.
"""

from __future__ import annotations

import gc
import logging
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, NamedTuple, Protocol

import ray
from kafka.consumer.fetcher import ConsumerRecord
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition
from ray.util.queue import Empty, Full, Queue

from pipeline.kafka import clients
from pipeline.kafka.check import BrokerWatch
from pipeline.kafka.positions import partition_name
from pipeline.wire import pack

log = logging.getLogger(__name__)


_NO_COMMIT = OffsetAndMetadata(-1, "", -1)  # a partition with no commit yet
# A record's timestamp type (Kafka's TimestampType): the producer's CreateTime or the broker's
# LogAppendTime (a topic with message.timestamp.type=LogAppendTime).
CREATE_TIME, LOG_APPEND_TIME = 0, 1
AWAY = object()  # what `KafkaSourceActor._ask` returns when no broker answered
PROBE_INTERVAL_S = 1.0  # how often an idle source checks that a broker still answers


class SourceRecord(NamedTuple):
    """One polled message (a tuple: one is made per message, a frozen dataclass costs more)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone
    timestamp_ms: int
    headers: Sequence[tuple[str, bytes | None]] = ()  # the producer's, in order
    timestamp_type: int = CREATE_TIME  # who set `timestamp_ms`: the producer or the broker


def source_record(message: ConsumerRecord) -> SourceRecord:
    """What a stage sees of a polled message."""
    return SourceRecord(
        message.topic,
        message.partition,
        message.offset,
        message.key,
        message.value,
        message.timestamp,
        message.headers,
        message.timestamp_type,
    )


@dataclass
class Work:
    """What a stage made of some records: queue items, in order, and dead letters."""

    items: list[Any] = field(default_factory=list)
    dead_letters: list[Any] = field(default_factory=list)


class Stage(Protocol):
    """The per-source processing between the consumer and the queue. Every method is called from
    the source's one polling thread, never concurrently; none may block on the network."""

    def assign(self, tp: TopicPartition, committed: OffsetAndMetadata | None) -> None:
        """A partition was assigned, before any of its records: resume from `committed` (its
        offset and metadata; None when the group never committed it)."""

    def revoke(self, tp: TopicPartition) -> None:
        """A partition was taken away: drop its state. Its records may come again from the last
        commit to another source, so nothing of it may be emitted after this."""

    def process(self, records: list[SourceRecord]) -> Work:
        """Records of one poll, in offset order per partition: what to queue and what to
        dead-letter. Must never raise for a bad record (a dead letter says why)."""

    def end_of_input(self) -> Work:
        """The input is over (a bounded run): emit what is still held, e.g. open windows."""

    def acknowledge(self, ack: Any) -> None:
        """Downstream made the work `ack` names durable (commit step 1)."""

    def commit_points(self) -> dict[TopicPartition, OffsetAndMetadata]:
        """Per partition, the offset up to which everything is durable, and the metadata to
        resume with (commit step 2). Must never pass an offset still needed by held work."""

    def pending(self) -> int:
        """Work handed out and not yet acknowledged (a draining source waits for 0)."""

    def stats(self) -> dict[str, Any]:
        """Counters for the source's report."""


class DeadLetterOutput(Protocol):
    """Where the source sends a stage's dead letters (`pipeline.stream.dlq.DeadLetterWriter`)."""

    def send(self, letters: list[Any]) -> None:
        """Queue letters for their topic (asynchronous)."""

    def flush(self, timeout_ms: int | None = None) -> None:
        """Return once every letter sent is in its topic (commit step 3)."""


class _Rebalance(AsyncConsumerRebalanceListener):
    """Commit what is safe before partitions go; forget them; pause new ones under backpressure."""

    def __init__(self, source: KafkaSourceActor) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Until the group hands out partitions again, an empty assignment means "rebalancing",
        # not "nothing to read": the end of the input cannot be detected in between.
        self.source._joined = False
        self.source.stats["revoked"] += len(revoked)
        offsets = self.source._safe_offsets(revoked)
        if offsets:
            try:
                await self.source._consumer.commit_async(offsets)
                self.source._committed.update(offsets)
            except KafkaError as error:  # the next owner replays from the older commit
                log.warning("commit on revocation failed: %r", error)
        self.source._forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.source._joined = True
        if self.source._paused_at is not None and assigned:
            self.source._consumer.pause(*assigned)

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.source._joined = False
        self.source._forget(lost)  # evicted: committing would fail, the next owner replays


@ray.remote(max_concurrency=2)  # `stop` and `acknowledge` are served while `run` loops
class KafkaSourceActor:
    """Polls `topics` in consumer group `group_id` and puts the stage's work items on `out`, each
    packed (`pipeline.stream.runtime.unpack` gives it back);
    `flush_downstream`, called while draining, asks the sink to make what it holds durable now;
    `watch` says how long a broker that went away is waited for (module docstring)."""

    def __init__(
        self,
        topics: list[str],
        group_id: str,
        client_options: dict[str, Any],
        out: Queue,
        stage: Stage,
        acks: Queue | None = None,
        max_records: int = 500,
        poll_timeout_ms: int = 200,
        dead_letters: Callable[[], DeadLetterOutput] | None = None,
        report: Callable[[str, dict[str, Any]], None] | None = None,
        name: str = "source",
        commit_interval_s: float = 0.2,
        group_instance_id: str | None = None,
        flush_downstream: Callable[[], None] | None = None,
        watch: BrokerWatch | None = None,
    ) -> None:
        self._out, self._acks = out, acks
        self._acked: SimpleQueue[Any] = SimpleQueue()  # filled by `acknowledge` on another thread
        self._stage = stage
        self._dead_letters = dead_letters() if dead_letters is not None else None
        self._report, self.name = report, name
        self._max_records, self._poll_timeout_ms = max_records, poll_timeout_ms
        self._commit_interval_s = commit_interval_s
        self._flush_downstream = flush_downstream
        # Without a watch a request waits as long as kafka-python's own timeouts say, then fails.
        self._watch = watch
        self._timeout_ms = watch.request_timeout_ms if watch is not None else None
        self._heard_at = time.monotonic()  # the last answer from a broker (or the last probe)
        self._stopping = threading.Event()
        self._joined = False
        self._paused_at: float | None = None
        self._known: set[TopicPartition] = set()  # partitions the stage has been given
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, OffsetAndMetadata] = {}
        self._stash: list[SourceRecord] = []  # polled while paused (a rebalance added partitions)
        self._put_in_flight: tuple[ray.ObjectRef, Any] | None = None  # (ref, item): see `_put`
        self._last_commit = self._last_report = 0.0
        self.stats = {"records": 0, "batches": 0, "commits": 0, "revoked": 0, "paused_seconds": 0.0}
        # A static member (`group_instance_id`) that restarts takes its partitions back at once
        # instead of waiting for the group to expire its predecessor, and fences that one out.
        self._consumer = clients.consumer(
            client_options,
            group_id=group_id,
            group_instance_id=group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        self._consumer.subscribe(topics, listener=_Rebalance(self))
        # Know the topics before the first poll joins the group: a leader without their metadata
        # assigns nothing, and the group only rebalances (seconds later) once it has it.
        for topic in topics:
            self._consumer.partitions_for_topic(topic)
        # What exists now (Ray, kafka-python, pydantic's schemas) lives as long as the actor:
        # keep the collector's full passes, triggered by the objects each event makes, off it.
        gc.freeze()
        # Every event allocates a dozen containers that die young; a collection every 10,000
        # allocations instead of 700 finds most of them gone (~7 % of the stage's time).
        gc.set_threshold(10_000, 10, 10)

    # ------------------------------------------------------------------ public

    def run(
        self,
        max_idle_seconds: float | None = 5.0,
        max_records: int | None = None,
        flush_at_end: bool = False,
        drain_timeout_s: float = 120.0,
        close_at_end: bool = False,
    ) -> dict[str, Any]:
        """Consume until `stop()`, or until the input looks exhausted: no record for
        `max_idle_seconds` with every assigned partition read to its end (or `max_records`
        read). Then fire what the stage still holds (`flush_at_end`: the input is over), wait for
        every item in flight to be acknowledged, and commit; with `close_at_end`, close the
        consumer."""
        idle_since, clock = time.monotonic(), self.stats  # `clock`: the wall-clock marks below
        cpu_from: float | None = None  # this process's CPU time at the poll of the first record
        while not self._stopping.is_set():
            if max_records is not None and self.stats["records"] >= max_records:
                break
            self._acknowledge()
            self._commit()
            self._maybe_report()
            polled_at, cpu_at = time.time(), time.process_time()
            records = self._poll(self._poll_timeout_ms)
            self._check_broker(bool(records))
            if records:
                idle_since = time.monotonic()
                clock.setdefault("first_record_at", polled_at)  # the clock includes that fetch
                cpu_from = cpu_at if cpu_from is None else cpu_from
                self._hand_over(self._stage.process(records))
                clock["last_record_at"] = time.time()
            elif (
                max_idle_seconds is not None
                and time.monotonic() - idle_since >= max_idle_seconds
                and self._caught_up()
            ):
                break
        # Wall-clock marks for benchmarks: the idle wait that detected the end is not work.
        clock["idle_wait_s"] = (
            time.monotonic() - idle_since if max_idle_seconds is not None else 0.0
        )
        if flush_at_end and not self._stopping.is_set():
            self._hand_over(self._stage.end_of_input())
        self._drain(drain_timeout_s)
        clock["finished_at"] = time.time()
        clock["cpu_seconds"] = time.process_time() - cpu_from if cpu_from is not None else 0.0
        self._maybe_report(force=True)
        snapshot = self.snapshot()
        if close_at_end:
            self.close()
        return snapshot

    def stop(self) -> None:
        """Stop polling; `run` then drains what is in flight, commits and returns."""
        self._stopping.set()

    def acknowledge(self, ack: Any) -> None:
        """Downstream: the work `ack` names is durable (handed to the stage by `run`'s thread)."""
        self._acked.put(ack)

    def close(self) -> None:
        """Leave the group (idempotent); everything committed stays committed."""
        self._consumer.close(autocommit=False)
        if self._dead_letters is not None:
            self._dead_letters.flush()

    def committed(self) -> dict[str, int]:
        """Committed offset per `topic:partition`, as the broker reports it."""
        return {
            partition_name(tp): self._consumer.committed(tp)
            for tp in sorted(self._consumer.assignment())
        }

    def snapshot(self) -> dict[str, Any]:
        lag = {}
        for tp, position in self._next.items():
            highwater = self._consumer.highwater(tp)
            if highwater is not None:
                lag[partition_name(tp)] = max(0, highwater - position)
        stage = self._stage.stats()
        return {
            **self.stats,
            **stage,
            "duplicates": stage.get("duplicates", 0),
            "open_windows": stage.get("open_windows", 0),
            "lag": lag,
            "committed": {partition_name(tp): o.offset for tp, o in self._committed.items()},
            "committed_metadata": {
                partition_name(tp): o.metadata for tp, o in self._committed.items()
            },
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    # ------------------------------------------------------------------ loop parts

    def _poll(self, timeout_ms: int) -> list[SourceRecord]:
        if self._stash:
            records, self._stash = self._stash, []
            return [r for r in records if TopicPartition(r.topic, r.partition) in self._known]
        polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=self._max_records)
        records = []
        for tp, messages in polled.items():
            if tp not in self._known:
                # A new assignment: the stage resumes from the committed offset and its metadata.
                while (committed := self._ask(self._consumer.committed, tp, True)) is AWAY:
                    pass
                self._stage.assign(tp, committed)
                self._known.add(tp)
            records += [source_record(m) for m in messages]
            self._next[tp] = messages[-1].offset + 1
        if records:
            self.stats["records"] += len(records)
            self.stats["batches"] += 1
        return records

    def _hand_over(self, work: Work) -> None:
        if work.dead_letters:
            if self._dead_letters is None:
                raise RuntimeError("the stage produced dead letters but the source has no DLQ")
            self._dead_letters.send(work.dead_letters)
        for item in work.items:
            self._put(item)

    def _put(self, item: Any) -> None:
        """Queue `item` behind the previous put, without waiting for this one: the round trip to
        the queue actor overlaps the next poll. One put at most is in flight, so items keep their
        order, and a full queue is noticed (and waited out) before the next item goes."""
        self._confirm_put()
        self._put_in_flight = (self._put_remote(item), item)

    def _put_remote(self, item: Any) -> ray.ObjectRef:
        return self._out.actor.put.remote(pack(item), self._poll_timeout_ms / 1000)

    def _confirm_put(self) -> None:
        """Wait until the put in flight is in the queue, retrying it while the queue is full."""
        while self._put_in_flight is not None:
            ref, item = self._put_in_flight
            try:
                ray.get(ref)
                self._put_in_flight = None
            except Full:
                # Backpressure: stop fetching but keep the group membership alive.
                if self._paused_at is None:
                    self._paused_at = time.monotonic()
                self._consumer.pause(*self._consumer.assignment())
                self._stash += self._poll(0)
                self._acknowledge()
                self._commit()
                self._maybe_report()
                self._put_in_flight = (self._put_remote(item), item)
        if self._paused_at is not None:
            self._consumer.resume(*self._consumer.paused())
            self.stats["paused_seconds"] += time.monotonic() - self._paused_at
            self._paused_at = None

    def _acknowledge(self) -> None:
        """Commit step 1: hand the sink's acks to the stage."""
        while not self._acked.empty():
            self._stage.acknowledge(self._acked.get())
        while self._acks is not None:
            try:
                self._stage.acknowledge(self._acks.get_nowait())
            except Empty:
                return

    def _commit(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_commit < self._commit_interval_s:
            return
        self._last_commit = time.monotonic()
        offsets = self._safe_offsets(self._known)
        if not offsets:
            return
        try:  # commit step 4
            if self._ask(self._consumer.commit, offsets) is AWAY:
                return
        except KafkaError as error:  # a rebalance is under way; its listener commits
            log.warning("commit failed: %r", error)
            return
        self._committed.update(offsets)
        self.stats["commits"] += 1

    def _safe_offsets(
        self, partitions: set[TopicPartition]
    ) -> dict[TopicPartition, OffsetAndMetadata]:
        """Offsets that moved past the last commit, made safe to commit: acks read, DLQ flushed."""
        self._acknowledge()  # commit step 1
        points = self._stage.commit_points()  # commit step 2
        offsets = {
            tp: point
            for tp, point in points.items()
            if tp in partitions and point.offset > self._committed.get(tp, _NO_COMMIT).offset
        }
        # Commit step 3: dead letters below the offsets must be in their topic first.
        flushed = not offsets or self._dead_letters is None or self._ask(self._dead_letters.flush)
        return {} if flushed is AWAY else offsets

    def _forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._stage.revoke(tp)
            self._known.discard(tp)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)

    def _caught_up(self) -> bool:
        if not self._joined:
            return False
        assigned = self._consumer.assignment()
        if not assigned:
            return True
        ends = self._ask(self._consumer.end_offsets, list(assigned))
        return ends is not AWAY and all(self._consumer.position(tp) >= ends[tp] for tp in assigned)

    def _check_broker(self, polled: bool) -> None:
        """Polled records prove a broker answers; an idle poll does not tell a quiet topic from
        a broker that went away, so now and then ask for the end offsets (the watch counts)."""
        now = time.monotonic()
        if polled:
            self._heard_at = now
            if self._watch is not None:
                self._watch.reached()
        elif self._watch is not None and now - self._heard_at >= PROBE_INTERVAL_S:
            self._heard_at = now
            if assigned := self._consumer.assignment():
                self._ask(self._consumer.end_offsets, list(assigned))

    def _ask(self, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args, timeout_ms=...)`, a request to the broker; AWAY when it failed for want of
        one (a retriable error), which the watch counts, and raises for once it lasted too long."""
        started = time.monotonic()
        try:
            answer = call(*args, timeout_ms=self._timeout_ms)
        except KafkaError as error:
            if not error.retriable or self._watch is None:
                raise
            self._watch.missed(error, started)
            return AWAY
        if self._watch is not None:
            self._heard_at = time.monotonic()
            self._watch.reached()
        return answer

    def _drain(self, timeout_s: float) -> None:
        self._confirm_put()
        deadline = time.monotonic() + timeout_s
        while self._stage.pending() and time.monotonic() < deadline:
            self._acknowledge()
            self._commit()
            if self._flush_downstream is not None:  # the last items need not wait for a timer
                self._flush_downstream()
            time.sleep(0.05)
        if self._stage.pending():
            log.warning(
                "%s: %d items still unacknowledged after %.0f s; their offsets stay uncommitted",
                self.name,
                self._stage.pending(),
                timeout_s,
            )
        self._commit(force=True)

    def _maybe_report(self, force: bool = False) -> None:
        if self._report is None or (not force and time.monotonic() - self._last_report < 1.0):
            return
        self._last_report = time.monotonic()
        self._report(self.name, self.snapshot())  # commit step 5: the sink forgets past keys
