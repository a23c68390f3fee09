"""Parquet sinks: atomic files in date/hour partitions, rotation, keys never written twice (also
after a restart), rows kept after a failed write, one writer per root, acks after durability.
Everything is read back with pyarrow.dataset, not with the sink's code."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import ray
from support import REPO, Source

from operators.windows import WindowSpec
from pipeline.kafka.positions import dead_letter_key, encode_watermark, row_key
from pipeline.sinks.files import RootLock, SinkError, local_root
from pipeline.sinks.schemas import DEAD_LETTER_SCHEMA, RESULT_SCHEMA
from pipeline.sinks.sink import Datasets, ParquetDataset, Rows, SinkActor
from pipeline.wire import pack

SCHEMA = pa.schema(
    [("key", pa.string()), ("time", pa.timestamp("ms", tz="UTC")), ("value", pa.int64())]
)
T0 = datetime(2025, 1, 6, 10, 59, tzinfo=UTC)


def rows(*keys: str, at: datetime = T0) -> list[dict]:
    return [{"key": key, "time": at, "value": i} for i, key in enumerate(keys)]


def result_row(key: str) -> dict:
    """A result row with every column null but its key and window start."""
    return {name: None for name in RESULT_SCHEMA.names} | {"key": key, "window_start": T0}


def letter_row(key: str) -> dict:
    return {name: None for name in DEAD_LETTER_SCHEMA.names} | {"key": key, "timestamp": T0}


def read(path: Path) -> pa.Table:
    return ds.dataset(path, format="parquet", partitioning="hive").to_table()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_files_land_in_hour_partitions_and_read_back(tmp_path):
    dataset = ParquetDataset(tmp_path / "d", SCHEMA, "time", "key")
    dataset.add(rows("a", "b") + rows("c", at=T0 + timedelta(minutes=2)))
    assert {r["key"] for r in dataset.flush()} == {"a", "b", "c"}
    table = read(tmp_path / "d")
    by_key = {r["key"]: (r["date"], r["hour"]) for r in table.to_pylist()}
    assert by_key == {"a": ("2025-01-06", 10), "b": ("2025-01-06", 10), "c": ("2025-01-06", 11)}
    assert not list((tmp_path / "d").glob("**/.*"))  # nothing half-written is left


def test_a_key_is_never_written_twice_even_after_a_restart(tmp_path):
    first = ParquetDataset(tmp_path / "d", SCHEMA, "time", "key")
    assert first.add(rows("a", "b", "a")) == []  # a buffered duplicate is dropped
    first.flush()
    assert first.add(rows("a", "c")) == ["a"]  # already durable: reported for an immediate ack
    first.flush()
    restarted = ParquetDataset(tmp_path / "d", SCHEMA, "time", "key")  # keys read back from files
    assert restarted.add(rows("b", "c", "d")) == ["b", "c"]
    restarted.flush()
    assert sorted(read(tmp_path / "d").column("key").to_pylist()) == ["a", "b", "c", "d"]


def test_keys_a_commit_put_out_of_replays_reach_are_forgotten(tmp_path):
    """Keys in memory are bounded by what a replay can still write: after the source's commit
    (offset 50 with watermark W) a dead letter below offset 50 and a window starting at or
    before W - (size + lateness) can never come again, and are forgotten; the others stay
    deduplicated, also when they were read back from files at a restart."""
    spec, watermark = WindowSpec.from_seconds(300, None, 30, 60), 1_000_000
    horizon = 360_000  # 5 min windows + 1 min lateness
    before = watermark - horizon  # the last window start that is closed at the watermark
    results = [
        row_key("iot", 0, start, "dev-1") for start in (before - 300_000, before, before + 1)
    ]
    letters = [dead_letter_key("iot", 0, offset) for offset in (49, 50)]
    first = Datasets(tmp_path, rotate_rows=100, rotate_seconds=60)
    first.results.add(result_row(key) for key in results)
    first.dlq.add(letter_row(key) for key in letters)
    for dataset in first:
        dataset.flush()
    restarted = Datasets(tmp_path, rotate_rows=100, rotate_seconds=60)
    assert restarted.results.durable == set(results) and restarted.dlq.durable == set(letters)

    other_partition = {"iot:1": 10**6}, {"iot:1": encode_watermark(10**12)}
    restarted.forget_committed(*other_partition, spec)
    assert restarted.results.durable == set(results)  # another partition's commit forgets none
    restarted.forget_committed({"iot:0": 50}, {"iot:0": encode_watermark(watermark)}, spec)
    assert restarted.results.durable == {results[2]}
    assert restarted.dlq.durable == {letters[1]}
    assert restarted.results.add([result_row(results[2])]) == [results[2]]  # still deduplicated


def test_keys_of_windows_before_the_replay_floor_are_not_read_back(tmp_path):
    old, recent = row_key("iot", 0, 0, "dev-1"), row_key("iot", 0, 1, "dev-1")
    first = Datasets(tmp_path, rotate_rows=100, rotate_seconds=60)
    first.results.add([result_row(old) | {"window_start": T0}])
    first.results.add([result_row(recent) | {"window_start": T0 + timedelta(hours=1)}])
    first.results.flush()
    restarted = Datasets(tmp_path, 100, 60, windows_since=T0 + timedelta(minutes=30))
    assert restarted.results.durable == {recent}
    assert Datasets(tmp_path, 100, 60).results.durable == {old, recent}


def test_rotation_by_rows_and_by_seconds(tmp_path):
    clock = Clock()
    dataset = ParquetDataset(
        tmp_path / "d", SCHEMA, "time", rotate_rows=3, rotate_seconds=5, clock=clock
    )
    assert not dataset.due()
    dataset.add(rows("a", "b"))
    assert not dataset.due()
    dataset.add(rows("c"))
    assert dataset.due()  # 3 rows
    dataset.flush()
    dataset.add(rows("d"))
    clock.now = 4.9
    assert not dataset.due()
    clock.now = 5.0
    assert dataset.due()  # the oldest row waited 5 s


def glob_counts(path: Path) -> tuple[int, int]:
    """Rows under `path` as DuckDB and polars count them with a plain `**/*.parquet` glob."""
    pattern = str(path / "**" / "*.parquet")
    [(in_duckdb,)] = duckdb.sql(f"SELECT count(*) FROM read_parquet('{pattern}')").fetchall()
    return in_duckdb, polars.scan_parquet(pattern).select(polars.len()).collect().item()


# Commits a small file, then big ones until it is killed: most of its time is in a temporary file.
WRITER = """
import sys
from pathlib import Path
import pyarrow as pa
from pipeline.sinks.files import commit_table
commit_table(pa.table({"key": ["a", "b"]}), Path(sys.argv[1]))
table = pa.table({"key": [str(i) for i in range(2_000_000)]})
while True:
    commit_table(table, Path(sys.argv[1]))
"""


def test_a_write_killed_midway_is_never_read_by_glob_readers_and_removed_at_start(tmp_path):
    partition = tmp_path / "d" / "date=2025-01-06" / "hour=10"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(partition)], cwd=REPO)
    try:
        while not [p for p in partition.glob(".*") if p.stat().st_size]:  # a write under way
            assert writer.poll() is None
            time.sleep(0.05)
    finally:
        writer.kill()  # SIGKILL: no cleanup of any kind
        writer.wait()
    committed = read(tmp_path / "d").num_rows  # pyarrow skips dot-files ...
    assert committed % 2_000_000 == 2
    assert glob_counts(tmp_path / "d") == (committed, committed)  # ... DuckDB and polars too
    (partition / ".tmp-part-1.parquet").write_bytes(b"PAR1 half a file")  # an older version's
    ParquetDataset(tmp_path / "d", SCHEMA, "time")
    assert not list(partition.glob(".*"))  # the next start deletes them
    assert read(tmp_path / "d").num_rows == committed


def test_rows_stay_buffered_when_a_write_fails(tmp_path):
    dataset = ParquetDataset(tmp_path / "d", SCHEMA, "time", "key")
    dataset.add(rows("a"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "date=2025-01-06").write_text(
        "not a directory"
    )  # the partition cannot be made
    with pytest.raises(OSError):
        dataset.flush()
    assert dataset.add(rows("a")) == []  # not durable, still buffered
    (tmp_path / "d" / "date=2025-01-06").unlink()
    assert [r["key"] for r in dataset.flush()] == ["a"]
    assert read(tmp_path / "d").column("key").to_pylist() == ["a"]


def test_one_writer_per_root(tmp_path):
    lock = RootLock(tmp_path, timeout_s=1)
    with pytest.raises(SinkError, match="locked"):
        RootLock(tmp_path, timeout_s=0.3)
    lock.release()
    RootLock(tmp_path, timeout_s=0.3).release()


def test_only_local_roots(tmp_path):
    assert local_root(f"file://{tmp_path}") == tmp_path.resolve()
    with pytest.raises(SinkError, match="local"):
        local_root("s3://bucket/results")


def test_the_sink_actor_acks_keys_once_they_are_durable(ray_local, tmp_path):
    source = Source.options(max_concurrency=2).remote()
    sink = SinkActor.remote(str(tmp_path), rotate_rows=1_000, rotate_seconds=3600)
    ray.get(sink.connect.remote([source]))
    result = {
        "key": "t/0/0/dev-1",
        "topic": "t",
        "partition": 0,
        "entity": "dev-1",
        "kind": "iot",
        "window_start": T0,
        "window_end": T0,
        "first_offset": 0,
        "last_offset": 9,
        "events": 10,
        "last_ingested": T0,
        "task": "summarize",
        "prompt": "p",
        "output": "o",
        "finish_reason": "eos",
        "facts": ["entity:dev-1"],
        "fact_accuracy": 1.0,
        "invented_facts": 0,
        "model_name": "m",
        "model_version": "1",
        "k": 4,
        "seed": 1,
        "tokens_in": 3,
        "tokens_out": 2,
        "steps": 1,
        "draws": 1,
        "queue_seconds": 0.0,
        "prefill_seconds": 0.0,
        "decode_seconds": 0.0,
        "latency_seconds": 0.0,
    }
    ray.get(sink.write.remote(pack(Rows(results=[(0, result)]))))
    assert ray.get(source.wait_for.remote(1, timeout_s=1.0)) == []  # buffered, not durable: no ack
    ray.get(sink.flush.remote())
    assert ray.get(source.wait_for.remote(1)) == [[result["key"]]]
    ray.get(sink.write.remote(pack(Rows(results=[(0, result)]))))  # a replay of a durable key ...
    assert ray.get(source.wait_for.remote(2)) == [[result["key"]]] * 2  # ... is acked at once
    stats = ray.get(sink.close.remote())
    assert stats["results"] == 1 and stats["duplicates_dropped"] == 1
    assert read(tmp_path / "results").column("key").to_pylist() == [result["key"]]
