"""Backpressure: with inference slowed artificially and a producer that keeps sending, the source
reads only as fast as windows are served — what it holds in memory stays bounded — while the
consumer lag grows in Kafka instead.
"""

from __future__ import annotations

import itertools
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from support import committed_offsets, pipeline_settings, tiny_registry

from pipeline.kafka.clients import kafka_client_options
from pipeline.kafka.local_broker import free_ports
from pipeline.sim.producer import TopicWriter, produce
from pipeline.sim.simulator import simulate
from pipeline.stream.job import JobOptions, ensure_topics, run_pipeline

QUEUE_BOUND = 2
RATE = 400  # events/s sent; the slowed model serves ~150 (one 30-event window per 0.2 s batch)
SECONDS = 20
HELD_BOUND = 1500  # records read but not committed: open windows (~300) + queue + batch in hand


def scrape(port: int) -> dict[str, float]:
    """Metric samples summed over their labels, from the live endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def consumed(port: int) -> float:
    try:
        return scrape(port).get("calm_events_consumed_total", 0.0)
    except OSError:  # the sink, which serves the endpoint, is still starting
        return 0.0


def test_slow_model_bounds_memory_and_grows_the_lag(
    ray_local, kafka_broker, tmp_path_factory, tmp_path
):
    port = free_ports(1)[0]
    settings = pipeline_settings(
        kafka_broker.bootstrap_servers,
        tmp_path,
        tiny_registry(tmp_path_factory),
        "backpressure",
        ray={"queue_max_batches": QUEUE_BOUND},
        kafka={"poll_max_records": 50},
        model={"batch_token_budget": 64},
        metrics={"port": port},
    )
    topic = settings.kafka.topics.iot
    ensure_topics(settings, [topic, settings.kafka.topics.transactions], partitions=2)

    client = kafka_client_options(settings.kafka)
    messages = simulate("iot", seed=7, entities=8).messages()
    produce(itertools.islice(messages, 100), TopicWriter(topic, client))  # a first trickle
    stop = threading.Event()
    out = {}
    pipeline = threading.Thread(
        target=lambda: out.setdefault(
            "report", run_pipeline(settings, JobOptions(slowdown_s=0.2), stop)
        )
    )
    pipeline.start()
    try:
        deadline = time.monotonic() + 180
        while not consumed(port):  # the pipeline is up and reading
            assert time.monotonic() < deadline and pipeline.is_alive(), "the pipeline did not start"
            time.sleep(0.5)
        sender = threading.Thread(
            target=lambda: produce(
                itertools.islice(messages, RATE * SECONDS), TopicWriter(topic, client), RATE
            )
        )
        sender.start()
        samples = []
        while sender.is_alive():
            time.sleep(2)
            metrics = scrape(port)
            offsets = committed_offsets(settings, topic).values()
            committed = sum(c or 0 for c, _ in offsets)
            samples.append(
                {
                    "lag": sum(end for _, end in offsets) - committed,
                    "held": metrics.get("calm_events_consumed_total", 0) - committed,
                    "queue": metrics.get("calm_num_requests_waiting", 0),
                }
            )
        sender.join()
    finally:
        stop.set()
        pipeline.join()
    report = out["report"]

    assert len(samples) >= 5, samples
    assert all(s["queue"] <= QUEUE_BOUND for s in samples), samples
    assert all(s["held"] <= HELD_BOUND for s in samples), samples
    lags, held = [s["lag"] for s in samples], max(s["held"] for s in samples)
    assert max(lags) > lags[len(lags) // 2] > lags[0], samples  # the lag grows ...
    assert max(lags) > 3 * held, samples  # ... far beyond what the source holds
    assert report.sources[0]["paused_seconds"] > 0  # the source waited on the full queue
    assert report.sink["results"] > 0
