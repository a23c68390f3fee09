"""`calm-stream bench pipeline`: the pipeline against its two ceilings, measured side by side.

One run, one broker, the same topics:

1. a backlog of simulated events (clean: every message decodes) in fresh IoT and transaction topics;
2. kafka-python's raw consume rate on those topics (poll and count, nothing else);
3. the pipeline with the model switched off (pass-through) on them: events/s, vs (2);
4. the pipeline with the model, on a shorter backlog of the same streams (the model is far slower
   than the stream): events/s and generated tokens/s;
5. the standalone engine on the same prompts, seeds and batch token budget: tokens/s, vs (4);
6. paced live runs (readings produced while the pipeline runs, at half the measured capacity),
   without and with the model, for the latency from a window's newest Kafka record to its
   committed result row, p50 and p99;
7. peak memory (max RSS) per actor, and CPU time per event of the raw consumer and of each
   pipeline actor (the request queue's actor, Ray's own, is not counted): the pipeline's rate
   on this machine is at most its cores over the pipeline's total.

Pipeline rates count from the start of the poll that brought the first record (its fetch included,
as in (2)) to the last offset commit, leaving out actor start-up and the quiet period that detects
the end of the backlog.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from kafka import TopicPartition

from model.bundle import Registry
from model.engine import Engine, Request, Sampling
from pipeline.kafka import clients
from pipeline.kafka.clients import kafka_client_options, kafka_consumer_options
from pipeline.settings import Settings, run_scoped_settings
from pipeline.sim.producer import TopicWriter, produce
from pipeline.sim.simulator import simulate
from pipeline.sinks.files import read_dataset
from pipeline.stream.inference import Batcher, row_seed
from pipeline.stream.job import JobOptions, JobReport, ensure_topics, run_pipeline

IOT_SHARE = 0.8
LIVE_WARMUP_S = 2.0  # rows whose input arrived before the pipeline was consuming are backlog
LIVE_DEVICES = 4
READINGS_PER_WINDOW = 30  # the simulator's 10 s interval over 300 s windows


def send_backlog(settings: Settings, events: int, seed: int) -> None:
    """`events` simulated messages, IoT readings and payments, into the settings' topics."""
    client, topics = kafka_client_options(settings.kafka), settings.kafka.topics
    iot = round(events * IOT_SHARE)
    for kind, topic, count in (
        ("iot", topics.iot, iot),
        ("transactions", topics.transactions, events - iot),
    ):
        stream = simulate(kind, seed=seed, entities=16 if kind == "iot" else 200)
        produce(itertools.islice(stream.messages(), count), TopicWriter(topic, client))


def raw_consume_rate(settings: Settings, total: int) -> dict[str, float]:
    """kafka-python reading the topics from the start and counting records: the ceiling. The
    partitions are assigned by hand (no group join to wait for) and the clock starts at the
    first poll, so the rate includes fetching as well as parsing; the consumer options (the
    fetch wait above all) are the sources' own."""
    topics = settings.kafka.topics
    consumer = clients.consumer(kafka_consumer_options(settings.kafka), enable_auto_commit=False)
    partitions = [
        TopicPartition(topic, p)
        for topic in (topics.iot, topics.transactions)
        for p in sorted(consumer.partitions_for_topic(topic) or ())
    ]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    seen, started, cpu_from = 0, time.perf_counter(), time.process_time()
    try:
        while seen < total:
            polled = consumer.poll(
                timeout_ms=settings.kafka.poll_timeout_ms,
                max_records=settings.kafka.poll_max_records,
            )
            seen += sum(len(messages) for messages in polled.values())
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_from
    finally:
        consumer.close()
    return {
        "events": seen,
        "seconds": round(seconds, 3),
        "events_per_s": round(seen / seconds, 1),
        "cpu_us_per_event": round(1e6 * cpu / seen, 1),
    }


def phase(settings: Settings, name: str, root: Path, topics: str | None = None) -> Settings:
    """The settings of one phase: its own group and sink root; with `topics`, its own topics
    (`<topic>.<topics>`)."""
    t = settings.kafka.topics
    if topics is not None:
        t = t.model_copy(
            update={"iot": f"{t.iot}.{topics}", "transactions": f"{t.transactions}.{topics}"}
        )
    kafka = settings.kafka.model_copy(
        update={"group_id": f"{settings.kafka.group_id}-{name}", "topics": t}
    )
    sinks = settings.sinks.model_copy(update={"root": str(root / name)})
    return settings.model_copy(update={"kafka": kafka, "sinks": sinks})


def ensure_input_topics(settings: Settings) -> None:
    topics = settings.kafka.topics
    ensure_topics(settings, [topics.iot, topics.transactions], partitions=2)


def pipeline_rates(report: JobReport) -> dict[str, Any]:
    seconds = report.processing_seconds
    return {
        "events": report.records,
        "seconds": round(seconds, 3),
        "events_per_s": round(report.records / seconds, 1),
        "tokens_out": report.tokens_out,
        "tokens_per_s": round(report.tokens_out / seconds, 1),
        "result_rows": report.sink["results"],
        "cpu_us_per_event": cpu_per_event(report),
    }


def cpu_per_event(report: JobReport) -> dict[str, float]:
    """Each actor's CPU time (all its threads) per event read, and their total."""
    cpu = {f"source-{i}": s["cpu_seconds"] for i, s in enumerate(report.sources)}
    cpu |= {f"inference-{i}": s["cpu_seconds"] for i, s in enumerate(report.inference)}
    cpu["sink"] = report.sink["cpu_seconds"]
    cpu["total"] = sum(cpu.values())
    return {name: round(1e6 * seconds / max(report.records, 1), 1) for name, seconds in cpu.items()}


def engine_rate(settings: Settings, results_path: Path) -> dict[str, Any]:
    """The engine alone on the rows' prompts and seeds, batched by the same token budget."""
    rows = read_dataset(results_path, ["key", "prompt", "model_version"]).to_pylist()
    registry = Registry(settings.model.registry)
    bundle = registry.open(registry.resolve(settings.model.bundle_version))
    engine = Engine(bundle, "calm", threads=settings.model.intra_op_threads)
    sampling = Sampling(settings.model.temperature, settings.model.sampler)
    batcher: Batcher[str] = Batcher(settings.model.batch_token_budget, float("inf"))
    ids = {row["key"]: engine.prompt_ids(row["prompt"]) for row in rows}
    for key, prompt in ids.items():
        batcher.add(key, len(prompt) + settings.model.max_new_tokens, 0.0)
    tokens, batches, started = 0, 0, time.perf_counter()
    while len(batcher):
        batch = batcher.take()
        results = engine.generate(
            [
                Request(ids[key], row_seed(key, bundle.id), settings.model.max_new_tokens)
                for key in batch
            ],
            sampling,
        )
        tokens += sum(r.stats.tokens_out for r in results)
        batches += 1
    seconds = time.perf_counter() - started
    return {
        "requests": len(rows),
        "batches": batches,
        "tokens_out": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
    }


def live_latency(
    settings: Settings, rate: float, seconds: float, seed: int, devices: int, passthrough: bool
) -> dict[str, Any]:
    """Readings of `devices` sent at `rate` per second while the pipeline runs; percentiles of
    the latency from a window's newest Kafka record to its committed row, for live rows only."""
    ensure_input_topics(settings)
    stop, out = threading.Event(), {}
    options = JobOptions(passthrough=passthrough)
    runner = threading.Thread(
        target=lambda: out.setdefault("report", run_pipeline(settings, options, stop))
    )
    runner.start()
    readings = simulate("iot", seed=seed + 1, entities=devices).messages()
    client = kafka_client_options(settings.kafka)
    produce(
        itertools.islice(readings, round(rate * seconds)),
        TopicWriter(settings.kafka.topics.iot, client),
        rate,
    )
    stop.set()  # the drain commits every window that closed
    runner.join()
    report: JobReport = out["report"]
    consuming_from = (
        min(s.get("first_record_at", float("inf")) for s in report.sources) + LIVE_WARMUP_S
    )
    latencies = np.array(
        [c - i for i, c in report.commit_times if i >= consuming_from], dtype=np.float64
    )
    summary: dict[str, Any] = {"rows": int(latencies.size), "events_per_s": rate}
    if latencies.size:
        summary |= {
            "p50_s": round(float(np.percentile(latencies, 50)), 3),
            "p99_s": round(float(np.percentile(latencies, 99)), 3),
        }
    return summary


def peak_memory(reports: dict[str, JobReport]) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for report in reports.values():
        for i, stats in enumerate(report.sources):
            peaks[f"source-{i}"] = max(peaks.get(f"source-{i}", 0.0), stats["max_rss_mb"])
        for i, stats in enumerate(report.inference):
            peaks[f"inference-{i}"] = max(peaks.get(f"inference-{i}", 0.0), stats["max_rss_mb"])
        peaks["sink"] = max(peaks.get("sink", 0.0), report.sink["max_rss_mb"])
    return {name: round(mb, 1) for name, mb in peaks.items()}


def bench_pipeline(
    settings: Settings,
    events: int = 20_000,
    model_events: int = 2_000,
    live_seconds: float = 30.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Every phase in one run (see the module docstring); `model_events` (a prefix of the same
    simulated streams) feed the phases with the model, which are far slower than the stream."""
    settings = run_scoped_settings(settings, f"bench-{uuid.uuid4().hex[:8]}")
    settings = settings.model_copy(
        update={
            "sinks": settings.sinks.model_copy(update={"rotate_seconds": 1.0}),
            "metrics": settings.metrics.model_copy(update={"port": 0}),
        }
    )
    with tempfile.TemporaryDirectory(prefix="calm-stream-bench-") as tmp:
        root = Path(tmp)
        stream = phase(settings, "passthrough", root)
        ensure_input_topics(stream)
        send_backlog(stream, events, seed)
        raw = raw_consume_rate(stream, events)
        reports = {
            "passthrough": run_pipeline(stream, JobOptions(passthrough=True, until_idle_s=1.0))
        }
        model = phase(settings, "model", root, topics="model")
        ensure_input_topics(model)
        send_backlog(model, model_events, seed)
        reports["model"] = run_pipeline(model, JobOptions(until_idle_s=1.0))
        passthrough, with_model = map(pipeline_rates, (reports["passthrough"], reports["model"]))
        engine = engine_rate(model, Path(reports["model"].paths["results"]))
        # Half of each measured capacity, in readings of few devices, so that windows close often.
        stream_rate = 0.5 * passthrough["events_per_s"]
        per_window = with_model["tokens_out"] / max(with_model["result_rows"], 1)
        model_rate = 0.5 * with_model["tokens_per_s"] / max(per_window, 1.0) * READINGS_PER_WINDOW
        latency = {
            "passthrough": live_latency(
                phase(settings, "live-stream", root, topics="live-stream"),
                round(stream_rate, 1),
                live_seconds,
                seed,
                devices=16,
                passthrough=True,
            ),
            "model": live_latency(
                phase(settings, "live-model", root, topics="live-model"),
                round(model_rate, 1),
                live_seconds,
                seed,
                devices=LIVE_DEVICES,
                passthrough=False,
            ),
            "rotate_seconds": settings.sinks.rotate_seconds,
            "batch_latency_ms": settings.model.batch_latency_ms,
        }
    return {
        "events": events,
        "model_events": model_events,
        "cpus": os.cpu_count(),
        "source_actors": settings.ray.source_actors,
        "fetch_max_wait_ms": settings.kafka.fetch_max_wait_ms,
        "inference_actors": settings.ray.inference_actors,
        "bundle": Registry(settings.model.registry).resolve(settings.model.bundle_version),
        "sampler": settings.model.sampler,
        "temperature": settings.model.temperature,
        "raw_consume": raw,
        "passthrough": passthrough,
        "passthrough_vs_raw": round(passthrough["events_per_s"] / raw["events_per_s"], 3),
        "passthrough_vs_raw_target": 0.8,
        "model": with_model,
        "engine_standalone": engine,
        "model_vs_engine": round(with_model["tokens_per_s"] / engine["tokens_per_s"], 3),
        "model_vs_engine_target": 0.85,
        "latency": latency,
        "peak_rss_mb": peak_memory(reports),
    }
