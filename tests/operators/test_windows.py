"""Event-time windows against a brute-force reference on shuffled, late and duplicated streams."""

import random
from collections import defaultdict

import pytest

from operators.events import IotReading, Metric, from_millis
from operators.windows import ClosedWindow, Rejected, Windower, WindowSpec

SPECS = [
    WindowSpec(size_ms=10_000, slide_ms=10_000, delay_ms=2_000, lateness_ms=3_000),  # tumbling
    WindowSpec(size_ms=10_000, slide_ms=2_500, delay_ms=1_000, lateness_ms=0),  # sliding
    WindowSpec(size_ms=7_000, slide_ms=3_000, delay_ms=0, lateness_ms=4_000),  # sliding, uneven
]


def reading(device: str, seq: int, ts_ms: int) -> IotReading:
    return IotReading(
        device_id=device,
        site="lab",
        seq=seq,
        ts=from_millis(ts_ms),
        metrics=(Metric(name="temperature", value=float(seq), unit="°C"),),
        firmware="1.0",
        status="ok",
    )


def random_stream(rng: random.Random) -> list[IotReading]:
    """Readings of a few devices, in a shuffled arrival order: jittered, late and duplicated."""
    events = []
    for device in ("dev-1", "dev-2", "dev-3"):
        for seq in range(rng.randint(5, 40)):
            # on and next to every boundary; event times start at 1970 (operators.events)
            ts = rng.randint(1, 120) * 500 + rng.choice((-1, 0, 0, 1))
            events.append(reading(device, seq, ts))
    arrival = sorted(events, key=lambda e: e.ts)
    for _ in range(len(arrival) // 3):  # move some events later, some far later
        i = rng.randrange(len(arrival))
        arrival.insert(min(len(arrival), i + rng.choice([1, 3, 10, 40])), arrival.pop(i))
    for _ in range(len(arrival) // 8):  # exact re-deliveries
        i = rng.randrange(len(arrival))
        arrival.insert(rng.randint(i, len(arrival)), arrival[i])
    return arrival


def reference(spec: WindowSpec, arrivals: list[IotReading]):
    """Brute force: window w holds id x iff some copy of x arrived while W < close(w),
    with W the watermark before that arrival (max event time of earlier arrivals - delay)."""
    contents: dict[tuple[str, int], set[str]] = defaultdict(set)
    late, duplicates = [], []
    watermark = None
    for index, e in enumerate(arrivals):
        ts = int(e.ts.timestamp() * 1000)
        first = -(spec.size_ms // spec.slide_ms + 1) * spec.slide_ms
        starts = [s for s in range(first, 70_000, spec.slide_ms) if s <= ts < s + spec.size_ms]
        is_open = {
            s: watermark is None or watermark < s + spec.size_ms + spec.lateness_ms for s in starts
        }
        eid = f"{e.device_id}#{e.seq}"
        if any(is_open[s] and eid in contents[e.device_id, s] for s in starts):
            duplicates.append(index)
        else:
            for s in starts:
                if is_open[s]:
                    contents[e.device_id, s].add(eid)
            if not all(is_open.values()):
                late.append((index, tuple(s for s in starts if not is_open[s])))
        watermark = max(watermark if watermark is not None else -(10**18), ts - spec.delay_ms)
    return {k: v for k, v in contents.items() if v}, late, duplicates


def run(spec: WindowSpec, arrivals: list[IotReading]):
    windower = Windower(spec)
    outputs = []
    for index, event in enumerate(arrivals):
        outputs += [(index, out) for out in windower.add(event, partition=("t", 0), offset=index)]
    outputs += [(len(arrivals), out) for out in windower.flush()]
    return outputs


@pytest.mark.parametrize("spec", SPECS, ids=["tumbling", "sliding", "sliding-uneven"])
@pytest.mark.parametrize("seed", range(25))
def test_windows_equal_the_brute_force_reference(spec: WindowSpec, seed: int) -> None:
    arrivals = random_stream(random.Random(seed))
    want_windows, want_late, want_duplicates = reference(spec, arrivals)
    outputs = run(spec, arrivals)
    windows = [out for _, out in outputs if isinstance(out, ClosedWindow)]
    got = {(w.key, w.start_ms): {r.id for r in w.records} for w in windows}
    assert got == want_windows
    assert len(windows) == len(got)  # each window fires exactly once
    rejected = [(r.record.offset, r) for _, r in outputs if isinstance(r, Rejected)]
    assert [(i, r.windows) for i, r in rejected if r.reason == "late"] == want_late
    assert [i for i, r in rejected if r.reason == "duplicate"] == want_duplicates
    assert want_late, "the random stream must exercise lateness"
    for w in windows:
        assert [(r.ts_ms, r.id) for r in w.records] == sorted((r.ts_ms, r.id) for r in w.records)
        assert all(w.start_ms <= r.ts_ms < w.end_ms for r in w.records)


@pytest.mark.parametrize("spec", SPECS[:2], ids=["tumbling", "sliding"])
def test_windows_fire_when_the_watermark_passes_their_end_plus_lateness(spec: WindowSpec) -> None:
    windower = Windower(spec)
    outputs = windower.add(reading("dev-1", 0, 1_000))
    close = spec.close_ms(max(spec.starts(1_000)))  # the last window holding t=1000 closes last
    outputs += windower.add(reading("dev-2", 0, close + spec.delay_ms - 1))
    assert (
        sum(isinstance(o, ClosedWindow) and o.key == "dev-1" for o in outputs)
        == len(spec.starts(1_000)) - 1
    )
    outputs = windower.add(reading("dev-2", 1, close + spec.delay_ms))
    assert [o.key for o in outputs if isinstance(o, ClosedWindow)][-1:] == ["dev-1"]
    assert windower.watermark_ms == close
    assert isinstance(windower.add(reading("dev-1", 1, 1_000))[0], Rejected)


@pytest.mark.parametrize("seed", range(10))
def test_open_windows_hold_back_the_commit_point(seed: int) -> None:
    """min_open_offsets is, per partition, the smallest offset of an event in a window not yet fired."""
    rng = random.Random(seed)
    spec = SPECS[seed % len(SPECS)]
    windower = Windower(spec)
    held: dict[tuple[str, int], list[tuple[tuple[str, int], int]]] = defaultdict(
        list
    )  # window -> offsets
    for offset, event in enumerate(random_stream(rng)):
        partition = ("topic", offset % 3)
        outputs = windower.add(event, partition=partition, offset=offset)
        rejected = {o.record.offset: o for o in outputs if isinstance(o, Rejected)}
        duplicate = offset in rejected and rejected[offset].reason == "duplicate"
        if not duplicate:
            missed = rejected[offset].windows if offset in rejected else ()
            for start in spec.starts(int(event.ts.timestamp() * 1000)):
                if start not in missed:
                    held[event.device_id, start].append((partition, offset))
        for o in outputs:
            if isinstance(o, ClosedWindow):
                assert sorted(r.offset for r in o.records) == sorted(
                    off for _, off in held.pop((o.key, o.start_ms))
                )
        want: dict[tuple[str, int], int] = {}
        for offsets in held.values():
            for p, off in offsets:
                want[p] = min(off, want.get(p, off))
        assert windower.min_open_offsets() == want
    assert windower.open_windows == len(held)


def test_closed_windows_report_their_offset_range_per_partition() -> None:
    windower = Windower(SPECS[0])
    windower.add(reading("dev-1", 0, 1_000), partition=("a", 0), offset=5)
    windower.add(reading("dev-1", 1, 2_000), partition=("a", 1), offset=9)
    windower.add(reading("dev-1", 2, 3_000), partition=("a", 0), offset=7)
    [window] = windower.flush()
    assert window.offsets == {("a", 0): (5, 7), ("a", 1): (9, 9)}
    assert windower.open_windows == 0 and windower.min_open_offsets() == {}


def test_window_geometry() -> None:
    sliding = WindowSpec.from_seconds(10, slide=2.5)
    assert list(sliding.starts(10_000)) == [2_500, 5_000, 7_500, 10_000]
    assert list(sliding.starts(-1)) == [-10_000, -7_500, -5_000, -2_500]
    assert list(WindowSpec.from_seconds(300).starts(299_999)) == [0]
    for bad in (
        {"size_ms": 0, "slide_ms": 1},
        {"size_ms": 10, "slide_ms": 11},
        {"size_ms": 10, "slide_ms": 5, "delay_ms": -1},
    ):
        with pytest.raises(ValueError):
            WindowSpec(**bad)
