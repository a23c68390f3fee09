"""Keyed event-time windows (tumbling or sliding) with a watermark and allowed lateness.

Semantics, in the order an arriving event is handled:

1. The event belongs to every window [start, start + size) that contains its event time, with
   starts on multiples of `slide` (tumbling: slide == size).
2. A window is *closed* once the watermark W = (max event time seen) - delay reaches
   end + allowed_lateness. A window fires exactly once, when it closes; events for a closed
   window are *late*: they come out as `Rejected(reason="late")` naming the windows they missed
   (an event of a sliding window still joins those of its windows that are open).
3. An event whose id is already in one of its open windows is a re-delivered copy: it comes out
   as `Rejected(reason="duplicate")` and is not added again.
4. The watermark is updated with the event's time only after it was placed, then every window
   whose close time the watermark has reached is emitted as a `ClosedWindow`.

The state lives only in memory: after a crash the pipeline replays from the committed offsets,
which open windows hold back, and rebuilds it. `min_open_offsets()` tells the pipeline, per source partition, the first offset an open window still needs: committing past it
would lose those events on a crash.
"""

import heapq
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from operators.events import (
    IotReading,
    Transaction,
    entity_id,
    event_id,
    event_time_ms,
)

Event = IotReading | Transaction
SourcePartition = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class WindowSpec:
    """Window geometry and watermark policy, all in milliseconds."""

    size_ms: int
    slide_ms: int
    delay_ms: int = 0
    lateness_ms: int = 0

    def __post_init__(self) -> None:
        if self.size_ms <= 0:
            raise ValueError(f"size_ms must be > 0, got {self.size_ms}")
        if not 0 < self.slide_ms <= self.size_ms:
            raise ValueError(
                f"slide_ms must be in (0, size_ms={self.size_ms}], got {self.slide_ms}"
            )
        if self.delay_ms < 0 or self.lateness_ms < 0:
            raise ValueError("delay_ms and lateness_ms must be >= 0")

    @classmethod
    def from_seconds(
        cls, size: float, slide: float | None = None, delay: float = 0, lateness: float = 0
    ) -> "WindowSpec":
        """Tumbling when `slide` is None, sliding otherwise."""
        ms = lambda seconds: round(seconds * 1000)
        return cls(ms(size), ms(slide if slide is not None else size), ms(delay), ms(lateness))

    def starts(self, ts_ms: int) -> range:
        """Starts of the windows that contain `ts_ms`, oldest first."""
        first = ((ts_ms - self.size_ms) // self.slide_ms + 1) * self.slide_ms  # start > ts - size
        return range(first, ts_ms + 1, self.slide_ms)

    def close_ms(self, start_ms: int) -> int:
        """The watermark at which the window starting at `start_ms` fires."""
        return start_ms + self.size_ms + self.lateness_ms

    def last_closed_start(self, watermark_ms: int) -> int:
        """Windows starting at or before this are closed at `watermark_ms` (`close_ms` reached)."""
        return watermark_ms - self.size_ms - self.lateness_ms


class Record(NamedTuple):
    """An event as the windower holds it, with where it came from (a tuple: one is made per
    event, and a frozen dataclass costs three times as much to build)."""

    event: Event
    partition: SourcePartition
    offset: int  # < 0 when the event has no source offset (tests, files)
    ts_ms: int
    id: str


@dataclass(frozen=True)
class ClosedWindow:
    """A fired window: its events sorted by (event time, id), whatever order they arrived in."""

    key: str
    start_ms: int
    end_ms: int
    records: tuple[Record, ...]
    offsets: dict[SourcePartition, tuple[int, int]]  # first and last offset per partition

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(r.event for r in self.records)


@dataclass(frozen=True)
class Rejected:
    """An event that did not (fully) make it into its windows, and why."""

    record: Record
    reason: Literal["late", "duplicate"]
    windows: tuple[int, ...]  # starts of the windows it missed (late) or was already in


@dataclass
class _OpenWindow:
    records: list[Record] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    min_offset: dict[SourcePartition, int] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        self.records.append(record)
        self.ids.add(record.id)
        if 0 <= record.offset < self.min_offset.get(record.partition, record.offset + 1):
            self.min_offset[record.partition] = record.offset


Output = ClosedWindow | Rejected


class Windower:
    """Event-time windows per entity. Feed it with `add`; it returns what became final."""

    def __init__(self, spec: WindowSpec):
        self.spec = spec
        self.watermark_ms: int | None = None
        self._open: dict[tuple[str, int], _OpenWindow] = {}
        self._closing: list[tuple[int, str, int]] = []  # heap of (close_ms, key, start_ms)

    def add(
        self, event: Event, *, partition: SourcePartition = ("", 0), offset: int = -1
    ) -> list[Output]:
        """Place one event; return its rejection (if any) and the windows that closed after it."""
        record = Record(event, partition, offset, event_time_ms(event), event_id(event))
        return self._place(record) + self._advance(record.ts_ms - self.spec.delay_ms)

    def advance_watermark(self, watermark_ms: int) -> list[ClosedWindow]:
        """Move the watermark forward without an event (an idle source, a processing-time tick)."""
        return self._advance(watermark_ms)

    def flush(self) -> list[ClosedWindow]:
        """End of input: fire every open window."""
        closed = [self._close(key, start) for _, key, start in sorted(self._closing)]
        self._closing.clear()
        return closed

    def min_open_offsets(self) -> dict[SourcePartition, int]:
        """Per partition, the smallest offset still held by an open window."""
        needed: dict[SourcePartition, int] = {}
        for window in self._open.values():
            for partition, offset in window.min_offset.items():
                needed[partition] = min(offset, needed.get(partition, offset))
        return needed

    @property
    def open_windows(self) -> int:
        return len(self._open)

    def _place(self, record: Record) -> list[Output]:
        key = entity_id(record.event)
        starts = self.spec.starts(record.ts_ms)
        closed = self._closed_count(starts)
        open_starts = starts[closed:]
        seen_in = [
            s for s in open_starts if (key, s) in self._open and record.id in self._open[key, s].ids
        ]
        if seen_in:
            return [Rejected(record, "duplicate", tuple(seen_in))]
        for start in open_starts:
            window = self._open.get((key, start))
            if window is None:
                window = self._open[key, start] = _OpenWindow()
                heapq.heappush(self._closing, (self.spec.close_ms(start), key, start))
            window.add(record)
        return [Rejected(record, "late", tuple(starts[:closed]))] if closed else []

    def _closed_count(self, starts: range) -> int:
        """How many of `starts` (ascending) are closed windows: since close times grow with the
        start, they are a prefix, ending at the last start whose close the watermark reached."""
        if self.watermark_ms is None:
            return 0
        last_closed = self.spec.last_closed_start(self.watermark_ms)
        return max(0, min(len(starts), (last_closed - starts.start) // starts.step + 1))

    def _advance(self, watermark_ms: int) -> list[ClosedWindow]:
        if self.watermark_ms is not None and watermark_ms <= self.watermark_ms:
            return []
        self.watermark_ms = watermark_ms
        closed = []
        while self._closing and self._closing[0][0] <= watermark_ms:
            _, key, start = heapq.heappop(self._closing)
            closed.append(self._close(key, start))
        return closed

    def _close(self, key: str, start_ms: int) -> ClosedWindow:
        window = self._open.pop((key, start_ms))
        records = tuple(sorted(window.records, key=lambda r: (r.ts_ms, r.id)))
        offsets: dict[SourcePartition, tuple[int, int]] = {}
        for r in records:
            if r.offset >= 0:
                first, last = offsets.get(r.partition, (r.offset, r.offset))
                offsets[r.partition] = (min(first, r.offset), max(last, r.offset))
        return ClosedWindow(key, start_ms, start_ms + self.spec.size_ms, records, offsets)
