"""End to end: simulated events with malformed, late, reordered and duplicated messages through a
real broker, real Ray actors and the real onnxruntime engine, into Parquet read back by pyarrow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pyarrow.compute as pc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import (
    committed_offsets,
    pipeline_settings,
    read_back,
    read_topic,
    reference_windows,
    run_scraped,
    send,
    tiny_registry,
)

from operators.facts import reference_facts, score
from operators.stats import window_stats
from pipeline.kafka.local_broker import free_ports
from pipeline.sim.simulator import Mess
from pipeline.stream.job import JobOptions

MESS = Mess(late=0.02, reordered=0.03, duplicate=0.02, malformed=0.03)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return tiny_registry(tmp_path_factory)


def shows_results(text: str) -> bool:
    return any(
        family.name == "calm_results_committed" and family.samples[0].value > 0
        for family in text_string_to_metric_families(text)
    )


def test_every_window_once_every_bad_message_in_the_dlq_offsets_at_the_end(
    ray_local, kafka_broker, registry, tmp_path
):
    port = free_ports(1)[0]
    # Two sources in one group: the second joins while the first consumes, so partitions move.
    settings = pipeline_settings(
        kafka_broker.bootstrap_servers,
        tmp_path,
        registry,
        "e2e",
        metrics={"port": port},
        ray={"source_actors": 2},
    )
    sent = send(settings, "iot", 700, seed=3, entities=6, mess=MESS)
    sent += send(settings, "transactions", 250, seed=4, entities=25, mess=MESS)
    topics = settings.kafka.topics

    report, text = run_scraped(settings, JobOptions(until_idle_s=1.0), shows_results)

    results = read_back(tmp_path / "sink", "results")
    keys = results.column("key").to_pylist()
    assert len(keys) == len(set(keys))  # no key twice
    expected_facts, expected_reasons = {}, Counter()
    for topic in (topics.iot, topics.transactions):
        topic_windows, topic_reasons = reference_windows(settings, topic)
        for key, expected in topic_windows.items():
            w = expected.window
            stats = window_stats(w.key, w.start_ms, w.end_ms, w.events)
            expected_facts[key] = sorted(reference_facts(stats).elements())
        expected_reasons += topic_reasons
    assert set(keys) == set(expected_facts)  # exactly one row per closed window
    assert report.sink["results"] == len(keys)
    # The sink forgot the keys the commits put out of any replay's reach (it held them all once).
    assert report.sink["keys_held"] < report.sink["results"] + report.sink["dlq"]

    # Each summary is scored against its own window's facts.
    for row in results.select(
        ["key", "output", "facts", "fact_accuracy", "invented_facts"]
    ).to_pylist():
        assert row["facts"] == expected_facts[row["key"]]
        s = score(row["output"], row["facts"])
        assert row["fact_accuracy"] == s.accuracy and row["invented_facts"] == s.stated - s.matched

    # Every malformed message is in the DLQ, byte for byte, with the reason the simulator meant.
    dlq = read_back(tmp_path / "sink", "dlq")
    bad = Counter((m.key.encode(), m.value, m.reason.value) for m in sent if m.tag == "malformed")
    assert bad  # the input really had malformed messages
    letters = Counter(
        zip(
            dlq.column("message_key").to_pylist(),
            dlq.column("value").to_pylist(),
            dlq.column("reason").to_pylist(),
        )
    )
    assert +(bad - letters) == Counter()
    assert Counter(dlq.column("reason").to_pylist()) == expected_reasons
    assert expected_reasons["late"] > 0  # ... and late events, routed to the late topic
    late = dlq.filter(pc.equal(dlq.column("reason"), "late"))
    assert set(late.column("routed_to").to_pylist()) == {topics.late}
    dlq_topic = read_topic(settings, topics.dlq)
    assert len(dlq_topic) == sum(n for reason, n in expected_reasons.items() if reason != "late")
    headers = Counter(dict(r.headers)["calm.error.reason"].decode() for r in dlq_topic)
    assert headers == Counter({r: n for r, n in expected_reasons.items() if r != "late"})

    # Committed offsets are at the end of the input on every partition.
    for topic in (topics.iot, topics.transactions):
        for partition, (committed, end) in committed_offsets(settings, topic).items():
            assert committed == end, f"{topic}:{partition} committed {committed} of {end}"

    # Telemetry rows add up to the results.
    telemetry = read_back(tmp_path / "sink", "telemetry")
    for column in ("tokens_in", "tokens_out", "steps", "draws"):
        assert pc.sum(telemetry.column(column)).as_py() == pc.sum(results.column(column)).as_py()
    assert pc.sum(telemetry.column("batch_size")).as_py() == results.num_rows
    assert pc.sum(results.column("tokens_out")).as_py() > 0
    assert pc.min(telemetry.column("dollars")).as_py() > 0
    assert set(results.column("model_version").to_pylist()) == {"1"}

    # `calm-stream report` (the real CLI, in its own process) says the same from the files alone.
    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "report", str(tmp_path / "sink")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert shown["results"]["rows"] == results.num_rows
    assert shown["telemetry"]["tokens_out"] == pc.sum(results.column("tokens_out")).as_py()
    assert shown["telemetry"]["dollars"] == pytest.approx(
        pc.sum(telemetry.column("dollars")).as_py()
    )
    assert shown["dead_letters"]["by_reason"] == dict(expected_reasons)
    assert shown["results"]["faithfulness"]["rows_scored"] == results.num_rows
    assert shown["results"]["faithfulness"]["fact_accuracy_mean"] == pytest.approx(
        pc.mean(results.column("fact_accuracy")).as_py()
    )
    assert shown["telemetry"]["baseline_vs_calm_flops"] == pytest.approx(
        pc.sum(telemetry.column("baseline_flops")).as_py()
        / pc.sum(telemetry.column("flops")).as_py()
    )

    # The live endpoint showed the OpenTelemetry GenAI and calm_ metrics.
    for name in (
        "gen_ai_client_token_usage_bucket",
        "gen_ai_server_time_to_first_token_seconds",
        "gen_ai_server_time_per_output_token_seconds",
        "calm_generation_tokens_total",
        "calm_generative_steps_total",
        "calm_cost_dollars_total",
        "calm_cost_per_step_dollars",
        "calm_baseline_cost_dollars_total",
        "calm_results_committed_total",
        "calm_summary_fact_accuracy_bucket",
    ):
        assert name in text, name
