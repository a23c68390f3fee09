"""The sink actor: writes `results/`, `telemetry/` and `dlq/` under a sink root, crash-consistent
and idempotent, and tells each source which of its keys are durable.

Each dataset is Hive-partitioned by the UTC date and hour of one time column
(`results/date=2025-01-06/hour=10/part-....parquet`). Rows are buffered and written as one file
per partition when the buffer reaches `rotate_rows` or its oldest row is `rotate_seconds` old;
each file is committed atomically (pipeline/sinks/files.py: temp name, fsync, rename), so a
crash leaves either the whole file or a temporary one that the next start deletes.

A keyed dataset never writes a key twice: at start it reads the key column of every committed
file, and it drops rows whose key is already durable or already buffered. The `SinkActor` tells
each source which keys became durable, so that sources commit offsets only after durability; it
forgets the keys that the sources' commits put out of any replay's reach
(`Datasets.forget_committed`): a long run holds the keys of recent windows, not of all it wrote.
One process writes a sink root at a time (files.RootLock): the sink of a killed run may still be
flushing while its successor starts.
"""

from __future__ import annotations

import heapq
import logging
import resource
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from operators.windows import WindowSpec
from pipeline.kafka.positions import (
    dead_letter_key_position,
    decode_watermark,
    parse_partition_name,
    row_key_position,
)
from pipeline.sinks.files import (
    TEMP_GLOBS,
    RootLock,
    commit_table,
    hour_partition,
    local_root,
    read_dataset,
)
from pipeline.sinks.metrics import PipelineMetrics
from pipeline.sinks.schemas import DEAD_LETTER_SCHEMA, RESULT_SCHEMA, TELEMETRY_SCHEMA, TIMESTAMP
from pipeline.wire import unpack

log = logging.getLogger(__name__)

# A key's source partition and its position there (window start, offset): see `forget`.
KeyPosition = Callable[[str], tuple[tuple[str, int], int]]


class ParquetDataset:
    """One dataset directory: buffered rows, rotation, atomic commits, key deduplication."""

    def __init__(
        self,
        path: Path,
        schema: pa.Schema,
        time_column: str,
        key_column: str | None = None,
        rotate_rows: int = 10_000,
        rotate_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        key_position: KeyPosition | None = None,
        keys_since: datetime | None = None,
    ) -> None:
        self.path, self.schema, self.time_column, self.key_column = (
            path,
            schema,
            time_column,
            key_column,
        )
        self.rotate_rows, self.rotate_seconds, self._clock = rotate_rows, rotate_seconds, clock
        self._rows: list[dict[str, Any]] = []
        self._oldest: float | None = None
        self._buffered: set[str] = set()
        self.files_written = 0
        self._remove_temporaries()
        self._key_position = key_position
        # per source partition, a heap of (position, key) of the durable keys: see `forget`
        self._positions: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
        self.durable: set[str] = set()
        self._remember(self._committed_keys(keys_since))

    def add(self, rows: Iterable[dict[str, Any]]) -> list[str]:
        """Buffer new rows; return the keys of rows dropped because they are already durable
        (rows whose key is already buffered are dropped too: they become durable with it)."""
        already: list[str] = []
        for row in rows:
            if self.key_column is not None:
                key = row[self.key_column]
                if key in self.durable:
                    already.append(key)
                    continue
                if key in self._buffered:
                    continue
                self._buffered.add(key)
            if self._oldest is None:
                self._oldest = self._clock()
            self._rows.append(row)
        return already

    def due(self) -> bool:
        """The buffer is full or its oldest row waited `rotate_seconds`."""
        if not self._rows:
            return False
        return (
            len(self._rows) >= self.rotate_rows
            or self._clock() - self._oldest >= self.rotate_seconds
        )

    def flush(self) -> list[dict[str, Any]]:
        """Commit the buffer, one file per date/hour partition; return the rows now durable."""
        by_partition: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in self._rows:
            by_partition[hour_partition(row[self.time_column])].append(row)
        committed: list[dict[str, Any]] = []
        try:
            for partition, group in sorted(by_partition.items()):
                commit_table(pa.Table.from_pylist(group, schema=self.schema), self.path / partition)
                self.files_written += 1
                committed += group
        finally:
            # After a failed write the rows not committed stay buffered for the next attempt.
            done = {id(row) for row in committed}
            self._rows = [row for row in self._rows if id(row) not in done]
            self._oldest = self._oldest if self._rows else None
            if self.key_column is not None:
                keys = {row[self.key_column] for row in committed}
                self._remember(keys)
                self._buffered -= keys
        return committed

    def forget(self, partition: tuple[str, int], below: int) -> None:
        """Forget the durable keys of `partition` whose position is below `below`: the source
        committed past them, so no replay can produce them again. Keeps the keys held in memory
        bounded by what a replay can still write, not by everything ever written."""
        heap = self._positions.get(partition)
        while heap and heap[0][0] < below:
            self.durable.discard(heapq.heappop(heap)[1])

    def _remember(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key in self.durable:
                continue
            self.durable.add(key)
            if self._key_position is not None:
                partition, position = self._key_position(key)
                heapq.heappush(self._positions[partition], (position, key))

    def _remove_temporaries(self) -> None:
        for pattern in TEMP_GLOBS:
            for temp in self.path.glob(f"**/{pattern}"):
                log.info("removing %s: a write that never committed", temp)
                temp.unlink(missing_ok=True)

    def _committed_keys(self, since: datetime | None) -> list[str]:
        """The keys on disk; with `since`, of the rows whose time column is not older (the
        others are out of any replay's reach)."""
        if self.key_column is None:
            return []
        where = None if since is None else pc.field(self.time_column) >= pa.scalar(since, TIMESTAMP)
        table = read_dataset(self.path, [self.key_column], self.schema, where)
        return table.column(self.key_column).to_pylist()


class Datasets:
    """The three datasets of a sink root."""

    def __init__(
        self,
        root: Path,
        rotate_rows: int,
        rotate_seconds: float,
        windows_since: datetime | None = None,
    ) -> None:
        """`windows_since`: no replay can fire a window that started before it (see
        `pipeline.stream.job.replay_floor`): the keys of older result rows are not read back."""
        rotation = {"rotate_rows": rotate_rows, "rotate_seconds": rotate_seconds}
        self.results = ParquetDataset(
            root / "results",
            RESULT_SCHEMA,
            "window_start",
            "key",
            key_position=row_key_position,
            keys_since=windows_since,
            **rotation,
        )
        self.telemetry = ParquetDataset(root / "telemetry", TELEMETRY_SCHEMA, "time", **rotation)
        self.dlq = ParquetDataset(
            root / "dlq",
            DEAD_LETTER_SCHEMA,
            "timestamp",
            "key",
            key_position=dead_letter_key_position,
            **rotation,
        )

    def forget_committed(
        self, committed: Mapping[str, int], metadata: Mapping[str, str], spec: WindowSpec | None
    ) -> None:
        """A source committed `committed` offsets (by `partition_name`) with their `metadata`
        (the watermark a replay resumes with): forget the keys no replay can write. A replay
        starts at the offset, so dead letters below it never come again; it resumes with the
        watermark, on which the windows of `spec` up to `last_closed_start` are closed."""
        for name, offset in committed.items():
            tp = parse_partition_name(name)
            self.dlq.forget(tp, below=offset)
            watermark = decode_watermark(metadata.get(name))
            if watermark is not None and spec is not None:
                self.results.forget(tp, below=spec.last_closed_start(watermark) + 1)

    def __iter__(self):
        return iter((self.results, self.telemetry, self.dlq))


@dataclass(frozen=True)
class Rows:
    """One write to the sink: result rows and dead letters, each with the index of the source
    that waits for it, and telemetry rows; sent packed (`pipeline.stream.runtime.pack`)."""

    results: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


@ray.remote
class SinkActor:
    """Writes rows for every inference actor and source, and acknowledges durable keys.

    `write` takes packed `Rows`; a background thread commits the datasets that are due. Once a
    key is durable (at once if it already was) its source's `acknowledge` is called with it;
    `connect` names the sources, by index. The sources' reports (`observe_source`) feed the
    Prometheus metrics, which live here, and say what they committed: with the job's
    `window_spec` the keys no replay can write again are forgotten then; `windows_since` keeps
    the keys of older windows from being read back at all.
    """

    def __init__(
        self,
        root: str,
        rotate_rows: int,
        rotate_seconds: float,
        metrics_host: str = "127.0.0.1",
        metrics_port: int = 0,
        lock_timeout_s: float = 120.0,
        window_spec: WindowSpec | None = None,
        windows_since: datetime | None = None,
    ) -> None:
        self.root = local_root(root)
        self._window_spec = window_spec
        self._lock = RootLock(self.root, lock_timeout_s)
        self._datasets = Datasets(self.root, rotate_rows, rotate_seconds, windows_since)
        self._sources: list[Any] = []
        self._waiting: dict[str, set[int]] = defaultdict(set)  # key -> sources waiting for it
        self._mutex = threading.Lock()
        self.metrics = PipelineMetrics()
        if metrics_port:
            self.metrics.serve(metrics_host, metrics_port)
        # (Kafka timestamp of the window's newest record, commit time) of recent rows, epoch seconds
        self._commits: deque[tuple[float, float]] = deque(maxlen=100_000)
        self._stopped = threading.Event()
        self.stats = {"results": 0, "telemetry": 0, "dlq": 0, "duplicates_dropped": 0}
        self._flusher = threading.Thread(
            target=self._flush_loop, args=(min(rotate_seconds, 0.5),), daemon=True
        )
        self._flusher.start()
        self._cpu_from = time.process_time()  # `close` reports the CPU time since (or `connect`)

    def connect(self, sources: list[Any]) -> None:
        """The actors (or anything with `acknowledge`) waiting for keys, indexed by origin.
        Called once, before any source runs, so that no ack finds no one to go to."""
        self._sources = list(sources)
        self._cpu_from = time.process_time()  # the handles imported their module: start-up

    def write(self, packed: bytes) -> None:
        """Buffer `pack(Rows(...))`, acknowledge what is already durable, commit what is due.

        Contract: a key is acknowledged to its source only once its row is in a renamed,
        fsynced file (commit step 1 of pipeline/stream/source.py); a key already written is never
        written again (a replay's copy is dropped and acknowledged at once). Never raises for a
        row: a failed file write keeps the rows buffered for the next attempt."""
        rows: Rows = unpack(packed)
        with self._mutex:
            acks: dict[int, list[str]] = defaultdict(list)
            for dataset, items in (
                (self._datasets.results, rows.results),
                (self._datasets.dlq, rows.dead_letters),
            ):
                for origin, row in items:
                    self._waiting[row["key"]].add(origin)
                for key in dataset.add(row for _, row in items):
                    self.stats["duplicates_dropped"] += 1
                    for origin in self._waiting.pop(key, ()):
                        acks[origin].append(key)
            self._datasets.telemetry.add(rows.telemetry)
            self._send(acks)
            self._flush(lambda dataset: dataset.due())

    def observe_source(
        self, source: str, stats: dict[str, Any], queue_depth: int | None = None
    ) -> None:
        """A source's report: its metrics, and the offsets it committed (commit step 5), below
        which the keys no replay can write are forgotten. Must never forget a key a replay from
        the committed offsets could still write."""
        self.metrics.observe_source(source, stats)
        if queue_depth is not None:
            self.metrics.queue_depth.set(queue_depth)
        with self._mutex:
            self._datasets.forget_committed(
                stats["committed"], stats["committed_metadata"], self._window_spec
            )

    def flush(self) -> dict[str, int]:
        """Commit everything buffered now (shutdown, or a source giving up partitions)."""
        with self._mutex:
            self._flush(lambda dataset: True)
            return dict(self.stats)

    def close(self) -> dict[str, Any]:
        stats = self.flush()
        self._stopped.set()
        self._flusher.join()
        self._lock.release()
        return {
            **stats,
            "keys_held": sum(len(dataset.durable) for dataset in self._datasets),
            "cpu_seconds": time.process_time() - self._cpu_from,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    def commit_times(self) -> list[tuple[float, float]]:
        """(newest Kafka record, commit) times of recently committed result rows."""
        return list(self._commits)

    def paths(self) -> dict[str, str]:
        return {d.path.name: str(d.path) for d in self._datasets}

    def _flush_loop(self, period: float) -> None:
        while not self._stopped.wait(period):
            with self._mutex:
                self._flush(lambda dataset: dataset.due())

    def _flush(self, should: Callable[[ParquetDataset], bool]) -> None:
        acks: dict[int, list[str]] = defaultdict(list)
        for dataset in self._datasets:
            if not should(dataset):
                continue
            rows = dataset.flush()
            name = dataset.path.name
            self.stats[name] += len(rows)
            self.metrics.observe(name, rows)
            if name == "results":
                now = time.time()
                self._commits.extend((row["last_ingested"].timestamp(), now) for row in rows)
            if dataset.key_column is not None:
                for row in rows:
                    for origin in self._waiting.pop(row["key"], ()):
                        acks[origin].append(row["key"])
        self._send(acks)

    def _send(self, acks: dict[int, list[str]]) -> None:
        for origin, keys in acks.items():
            self._sources[origin].acknowledge.remote(keys)
