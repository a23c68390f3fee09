"""Crash and restart: `calm-stream run` is SIGKILLed at several points (and once stopped with
SIGTERM, which must drain and exit cleanly) and restarted each time; the results are then exactly
what the operators and the standalone engine compute for every window, row for row, byte for
byte, with no key missing and none twice.

Each run is a driver process joining the test's Ray cluster, as a job on a long-lived cluster
does. SIGKILL takes the driver (and any process it started) down at once; Ray then tears down
the job's actors, as it does when a driver dies, and the restarted job meets them while they go:
the consumer group and the sink's root lock keep the two apart.
"""

from __future__ import annotations

import itertools
import signal
from functools import partial
from pathlib import Path

import pyarrow.compute as pc
import pytest
import ray
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from support import (
    MESS,
    Run,
    committed_offsets,
    files,
    pipeline_settings,
    read_back,
    reference_windows,
    send,
    tiny_registry,
    wait_for,
    write_config,
)

from model.bundle import Registry
from model.engine import Engine, Request, Sampling
from operators.events import from_millis
from operators.facts import reference_facts
from operators.prompts import render_prompt
from operators.stats import window_stats
from operators.windows import WindowSpec
from pipeline.kafka.positions import decode_watermark, encode_watermark
from pipeline.sim.simulator import simulate
from pipeline.sinks.schemas import DETERMINISTIC_RESULT_COLUMNS
from pipeline.stream.flow import FlowConfig, PartitionFlow, WindowRequest
from pipeline.stream.inference import row_seed
from pipeline.stream.job import ensure_topics, replay_floor
from pipeline.stream.source import SourceRecord


def expected_rows(settings, registry: Path) -> dict[str, dict]:
    """Each window's row as the operators and the standalone engine compute it, by key."""
    bundle = Registry(registry).open("latest")
    engine = Engine(bundle, "calm", threads=1)
    sampling = Sampling(settings.model.temperature, settings.model.sampler)
    rows = {}
    for topic in (settings.kafka.topics.iot, settings.kafka.topics.transactions):
        for key, expected in reference_windows(settings, topic)[0].items():
            w = expected.window
            stats = window_stats(w.key, w.start_ms, w.end_ms, w.events)
            prompt = render_prompt(stats)
            seed = row_seed(key, bundle.id)
            out = engine.generate(
                [Request(engine.prompt_ids(prompt), seed, settings.model.max_new_tokens)], sampling
            )[0]
            first, last = w.offsets[(topic, expected.partition)]
            rows[key] = {
                "key": key,
                "topic": topic,
                "partition": expected.partition,
                "entity": w.key,
                "window_start": from_millis(w.start_ms),
                "window_end": from_millis(w.end_ms),
                "first_offset": first,
                "last_offset": last,
                "events": len(w.records),
                "last_ingested": from_millis(expected.last_ingested_ms),
                "prompt": prompt,
                "output": out.text,
                "finish_reason": out.finish_reason,
                "facts": sorted(reference_facts(stats).elements()),
                "model_name": bundle.name,
                "model_version": bundle.version,
                "seed": seed,
                "tokens_in": out.stats.tokens_in,
                "tokens_out": out.stats.tokens_out,
                "steps": out.stats.steps,
                "draws": out.stats.head_samples,
            }
    return rows


def run_flow(flow: PartitionFlow, records: list[SourceRecord], end: bool = True) -> dict[str, str]:
    """What `flow` emits (key -> prompt, or dead-letter reason), each output acknowledged at once
    as a sink would; with `end`, the open windows are fired at the end of the input."""
    out = {}
    for record in records:
        requests, letters = [], []
        flow.process([record], requests, letters)
        for item in (*requests, *letters):
            out[item.key] = item.prompt if isinstance(item, WindowRequest) else item.reason
            flow.acknowledge(item.key)
    return out | ({r.key: r.prompt for r in flow.end_of_input()} if end else {})


def test_the_replay_floor_is_the_smallest_committed_watermark_less_the_window_horizon(
    kafka_broker, tmp_path
):
    """The sink reads back only the keys of windows a replay can still fire; what bounds them is
    the group's smallest committed watermark, and only once every input partition has one."""
    settings = pipeline_settings(kafka_broker.bootstrap_servers, tmp_path, None, "floor")
    iot, txn = settings.kafka.topics.iot, settings.kafka.topics.transactions
    ensure_topics(settings, [iot, txn], partitions=2)
    spec = WindowSpec.from_seconds(300, None, 30, 60)
    assert replay_floor(settings, spec) is None  # a fresh group: everything may replay
    committer = KafkaConsumer(
        bootstrap_servers=kafka_broker.bootstrap_servers,
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
    )
    marks = {
        TopicPartition(iot, 0): 5_000_000,
        TopicPartition(iot, 1): 4_000_000,
        TopicPartition(txn, 0): 6_000_000,
        TopicPartition(txn, 1): 7_000_000,
    }
    committer.assign(list(marks))
    first, last = list(marks)[:3], list(marks)[3]
    committer.commit({tp: OffsetAndMetadata(1, encode_watermark(marks[tp]), -1) for tp in first})
    assert replay_floor(settings, spec) is None  # one partition has no watermark yet
    committer.commit({last: OffsetAndMetadata(1, encode_watermark(marks[last]), -1)})
    committer.close(autocommit=False)
    assert replay_floor(settings, spec) == from_millis(4_000_000 - 360_000 + 1)  # 5 + 1 min


@pytest.mark.parametrize("cut", [150, 400, 777, 1100])
def test_a_flow_resumed_at_its_commit_point_emits_the_rest_of_the_first_run(cut):
    """Resume a partition's flow where it committed (offset + watermark metadata) after any
    prefix: together with what the prefix made durable it yields exactly the uninterrupted run's
    outputs, and everything not yet durable comes out identical. (Windows already durable may be
    re-emitted partially from their later events; the sink drops those by key.)"""
    spec = WindowSpec.from_seconds(300, None, 30, 30)
    config = FlowConfig(spec, "iot", "txn", "dlq", "late", 65_536, origin=0)
    messages = itertools.islice(simulate("iot", seed=9, entities=5, mess=MESS).messages(), 1300)
    records = [
        SourceRecord("iot", 0, offset, m.key.encode(), m.value, 1_795_000_000_000 + offset)
        for offset, m in enumerate(messages)
    ]
    whole = run_flow(PartitionFlow("iot", 0, config), records)
    assert "late" in whole.values() and "malformed_json" in whole.values()

    first = PartitionFlow("iot", 0, config)
    durable = run_flow(first, records[:cut], end=False)
    point = first.commit_point()
    assert point.offset < cut  # open windows hold the commit point back
    resumed = PartitionFlow("iot", 0, config, decode_watermark(point.metadata))
    replayed = run_flow(resumed, records[point.offset :])
    assert durable.keys() | replayed.keys() == whole.keys()  # nothing lost, nothing extra
    for key in replayed.keys() - durable.keys():
        assert replayed[key] == whole[key]


def test_sigkill_at_several_points_loses_nothing_duplicates_nothing_replays_identically(
    ray_local, kafka_broker, tmp_path_factory, tmp_path
):
    registry = tiny_registry(tmp_path_factory)
    slow = {
        "kafka": {"poll_max_records": 25},
        "ray": {"address": ray.get_runtime_context().gcs_address, "queue_max_batches": 1},
        "model": {"batch_token_budget": 64},
        "sinks": {"rotate_seconds": 0.3},
    }
    settings = pipeline_settings(
        kafka_broker.bootstrap_servers, tmp_path, registry, "crash", **slow
    )
    send(settings, "iot", 1500, seed=5, entities=8, mess=MESS)
    send(settings, "transactions", 300, seed=6, entities=20, mess=MESS)
    config, log = write_config(tmp_path / "settings.json", settings), tmp_path / "run.log"
    sink, topics = Path(settings.sinks.root), settings.kafka.topics

    def committed() -> int:
        return sum(
            c or 0
            for topic in (topics.iot, topics.transactions)
            for c, _ in committed_offsets(settings, topic).values()
        )

    def progressed(files_before: int, committed_before: int) -> bool:
        return files(sink) > files_before and committed() > committed_before

    run = Run(config, log)  # killed as soon as the first results are durable
    wait_for(lambda: files(sink) > 0, "a results file", run)
    run.kill()
    for stop in ("SIGKILL", "SIGTERM"):  # each after progress past the last stop
        run = Run(config, log)
        wait_for(partial(progressed, files(sink), committed()), "progress after the restart", run)
        if stop == "SIGTERM":  # graceful: drain, flush, commit, exit 0
            run.proc.send_signal(signal.SIGTERM)
            assert run.wait() == 0, log.read_text()[-3000:]
        else:
            run.kill()
    assert Run(config, log).wait() == 0, log.read_text()[-3000:]

    results = read_back(sink, "results")
    keys = results.column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a key was written twice"
    expected = expected_rows(settings, registry)
    assert set(keys) == set(expected)  # none missing, none extra
    columns = list(expected[keys[0]])
    assert set(columns) < set(DETERMINISTIC_RESULT_COLUMNS)
    for row in results.select(columns).to_pylist():
        assert row == expected[row["key"]]  # replayed or not, the row the window must give
    assert pc.sum(results.column("tokens_out")).as_py() > 0

    letters = read_back(sink, "dlq").column("key").to_pylist()
    assert len(letters) == len(set(letters))
    assert len(letters) == sum(
        sum(reference_windows(settings, t)[1].values()) for t in (topics.iot, topics.transactions)
    )
    for topic in (topics.iot, topics.transactions):
        for partition, (offset, end) in committed_offsets(settings, topic).items():
            assert offset == end, f"{topic}:{partition} committed {offset} of {end}"
