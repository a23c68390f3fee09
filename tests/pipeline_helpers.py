"""Shared set-up of the pipeline tests: simulated input in a real broker, a tiny real bundle.

The bundle is a small CALM (random weights: the tests check the stream, not the prose) exported
by the project's own exporter and verified by its loader, so the inference actors run the real
onnxruntime engine. Its tokenizer is trained on rendered window prompts, so prompts are short.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Container
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as ds

from operators.windows import ClosedWindow, Windower, WindowSpec
from pipeline.settings import Settings
from pipeline.sim.producer import KafkaSink, produce
from pipeline.sim.simulator import Mess, Message, simulate

if TYPE_CHECKING:
    from pipeline.stream.job import JobOptions, JobReport

REPO = Path(__file__).resolve().parents[1]


def tiny_registry(tmp_path_factory: Any, versions: tuple[str, ...] = ("1",)) -> Path:
    """A private copy of a registry built once per test session (the export costs seconds)."""
    cache = tmp_path_factory.getbasetemp() / "tiny-registry-cache"
    if not cache.exists():
        build_registry(tmp_path_factory.mktemp("tiny-build"), ("1", "2")).rename(cache)
    target = tmp_path_factory.mktemp("registry") / "registry"
    target.mkdir()
    for version in versions:
        shutil.copytree(cache / f"tiny-{version}", target / f"tiny-{version}")
    (target / "latest").write_text(f"tiny-{versions[0]}\n")
    return target


def build_registry(root: Path, versions: tuple[str, ...] = ("1",), seed: int = 0) -> Path:
    """A registry holding a tiny CALM bundle per version (different weights each), `latest` ->
    the first; returns the registry directory."""
    import torch

    from model.bundle import Registry
    from model.calm import CALM
    from model.config import AutoencoderConfig, BackboneConfig, CALMConfig
    from model.export import export_bundle
    from model.tokenizer import Tokenizer
    from operators.prompts import render_prompt
    from operators.stats import window_stats

    torch.set_num_threads(1)
    texts = []
    for kind in ("iot", "transactions"):
        windower = Windower(WindowSpec.from_seconds(300))
        for message in itertools.islice(simulate(kind, seed=seed, entities=8).messages(), 600):
            for out in windower.add(message.event):
                if isinstance(out, ClosedWindow):
                    texts.append(
                        render_prompt(window_stats(out.key, out.start_ms, out.end_ms, out.events))
                    )
    tokenizer = Tokenizer.train(texts, 512)
    staging = root / "staging"
    staging.mkdir(parents=True)
    tokenizer_path = staging / "tokenizer.json"
    tokenizer.save(tokenizer_path)
    registry = Registry(root / "registry")
    bundles = []
    for i, version in enumerate(versions):
        torch.manual_seed(seed + i)
        backbone = BackboneConfig(
            vocab_size=tokenizer.vocab_size,
            d_model=32,
            n_layers=2,
            n_heads=2,
            d_ff=64,
            max_seq_len=256,
        )
        autoencoder = AutoencoderConfig(
            vocab_size=tokenizer.vocab_size, latent_dim=8, d_model=32, d_ff=64
        )
        calm = CALM(CALMConfig(backbone=backbone, autoencoder=autoencoder, head_layers=2)).eval()
        bundles.append(
            export_bundle(
                calm,
                tokenizer_path,
                staging,
                "tiny",
                version,
                metrics={"note": "random weights, for pipeline tests"},
            )
        )
    registry.local_root.mkdir(parents=True)
    for bundle in bundles:
        shutil.copytree(bundle.path, registry.local_root / bundle.id)
    registry.set_latest(bundles[0].id)
    shutil.rmtree(staging)
    return registry.local_root


def pipeline_settings(
    broker: str, root: Path, registry: Path | None, name: str, **sections: Any
) -> Settings:
    """Small, fast settings for one test: its own topics, group and sink root."""
    values: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": [broker],
            "group_id": f"{name}-group",
            "poll_max_records": 200,
            "topics": {
                "iot": f"{name}.iot",
                "transactions": f"{name}.txn",
                "dlq": f"{name}.dlq",
                "late": f"{name}.late",
            },
        },
        "ray": {
            "source_actors": 1,
            "inference_actors": 1,
            "source_actor_cpus": 0.5,
            "inference_actor_cpus": 1.0,
            "queue_max_batches": 4,
        },
        "model": {
            "registry": str(registry or root / "no-registry"),
            "max_new_tokens": 16,
            "batch_latency_ms": 50,
            "batch_token_budget": 1024,
        },
        "windows": {
            "size_seconds": 300,
            "watermark_delay_seconds": 30,
            "allowed_lateness_seconds": 30,
        },
        "sinks": {"root": str(root / "sink"), "rotate_seconds": 0.5, "rotate_rows": 10_000},
        "metrics": {"port": 0},
    }
    for section, update in sections.items():
        values[section] = {**values.get(section, {}), **update}
    return Settings(**values)


def send(
    settings: Settings,
    kind: str,
    count: int,
    seed: int,
    entities: int,
    mess: Mess,
    partitions: int = 2,
) -> list[Message]:
    """Create the topic and send `count` simulated messages; returns them."""
    from pipeline.kafka.clients import kafka_client_options
    from pipeline.stream.job import ensure_topics

    topic = settings.kafka.topics.iot if kind == "iot" else settings.kafka.topics.transactions
    ensure_topics(settings, [topic], partitions)
    messages = list(
        itertools.islice(simulate(kind, seed=seed, entities=entities, mess=mess).messages(), count)
    )
    produce(iter(messages), KafkaSink(topic, kafka_client_options(settings.kafka)))
    return messages


def read_topic(settings: Settings, topic: str) -> list[Any]:
    """Every record of `topic`, partition by partition, with a plain kafka-python consumer."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers, enable_auto_commit=False
    )
    partitions = [
        TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
    ]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    ends = consumer.end_offsets(partitions)
    records: list[Any] = []
    while any(consumer.position(tp) < ends[tp] for tp in partitions):
        for batch in consumer.poll(timeout_ms=500).values():
            records += batch
    consumer.close()
    return sorted(records, key=lambda r: (r.partition, r.offset))


@dataclass(frozen=True)
class ExpectedWindow:
    partition: int
    window: ClosedWindow
    last_ingested_ms: int  # Kafka timestamp of the window's newest record


def reference_windows(
    settings: Settings, topic: str, skip: Container[tuple[int, int]] = ()
) -> tuple[dict[str, ExpectedWindow], Counter]:
    """What the pipeline must produce from `topic`, computed with the operators alone: every
    window (fired by the watermark, or at the end of the input) by row key, and the dead-letter
    reasons. The records at `skip` (partition, offset) are left out: the test accounts for them."""
    from operators.decode import DecodeError, decode
    from operators.events import from_millis
    from pipeline.kafka.positions import row_key
    from pipeline.stream.flow import expected_kind
    from pipeline.stream.job import window_spec

    windows, reasons = {}, Counter()
    windowers: dict[int, Windower] = {}
    ingested: dict[tuple[int, int], int] = {}
    topics = settings.kafka.topics

    def keep(partition: int, window: ClosedWindow) -> None:
        last = window.offsets[(topic, partition)][1]
        windows[row_key(topic, partition, window.start_ms, window.key)] = ExpectedWindow(
            partition, window, ingested[partition, last]
        )

    for record in read_topic(settings, topic):
        if (record.partition, record.offset) in skip:
            continue
        ingested[record.partition, record.offset] = record.timestamp
        windower = windowers.setdefault(record.partition, Windower(window_spec(settings)))
        event = decode(
            record.value,
            max_bytes=settings.kafka.max_message_bytes,
            expected_kind=expected_kind(topic, topics.iot, topics.transactions),
            now=from_millis(record.timestamp),
        )
        if isinstance(event, DecodeError):
            reasons[event.reason.value] += 1
            continue
        for out in windower.add(event, partition=(topic, record.partition), offset=record.offset):
            if isinstance(out, ClosedWindow):
                keep(record.partition, out)
            elif out.reason == "late":
                reasons["late"] += 1
    for partition, windower in windowers.items():
        for window in windower.flush():
            keep(partition, window)
    return windows, reasons


def committed_offsets(settings: Settings, topic: str) -> dict[int, tuple[int | None, int]]:
    """partition -> (the group's committed offset, the partition's end offset)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
    )
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    ends = consumer.end_offsets(partitions)
    offsets = {tp.partition: (consumer.committed(tp), ends[tp]) for tp in partitions}
    consumer.close(autocommit=False)
    return offsets


def read_back(root: Path, dataset: str) -> Any:
    """A dataset read with pyarrow alone: every committed Parquet file under root/dataset; None
    while nothing is committed (a directory may already hold the sink's temporary files)."""
    path = root / dataset
    if not path.exists():
        return None
    found = ds.dataset(path, format="parquet", partitioning="hive")
    return found.to_table() if found.files else None


def run_scraped(
    settings: Settings, options: JobOptions, enough: Callable[[str], bool]
) -> tuple[JobReport, str]:
    """run_pipeline(settings, options) while its metrics endpoint (settings.metrics.port) is
    scraped until a scrape is `enough`, or to the run's end (then the last scrape): the endpoint
    lives only as long as the run's sink. The job's report and the scrape."""
    from pipeline.stream.job import run_pipeline

    url = f"http://127.0.0.1:{settings.metrics.port}/metrics"
    done, scraped = threading.Event(), [""]

    def scrape() -> None:
        while not done.is_set():
            try:
                scraped[0] = urllib.request.urlopen(url, timeout=2).read().decode()
            except OSError:  # the sink, which serves the endpoint, is not up (yet, or any more)
                time.sleep(0.2)
                continue
            if enough(scraped[0]):
                return
            time.sleep(0.2)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        report = run_pipeline(settings, options)
    finally:
        done.set()
        scraper.join()
    return report, scraped[0]
