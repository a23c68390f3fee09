"""What the tests share: a real broker's topics filled with simulated input, tiny real bundles
(exported by the project's own exporter and verified by its loader, so the serving path runs the
real onnxruntime engine), reading a run's Parquet back, and small builders for the broker-free unit
tests (polled records made the way the source makes them, event payloads in their wire form).

The tiny bundles are small CALMs with random weights: the tests check the stream, not the prose.
Their tokenizer is trained on rendered window prompts, so prompts are short.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as ds
import ray
from hypothesis import strategies as st
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.consumer.fetcher import ConsumerRecord

from operators.events import IotReading, Metric, Transaction, from_millis, to_json_bytes
from operators.windows import ClosedWindow, Windower, WindowSpec
from pipeline.kafka.clients import kafka_client_options
from pipeline.settings import Settings
from pipeline.sim.producer import TopicWriter, produce
from pipeline.sim.simulator import Mess, Message, simulate
from pipeline.stream.source import CREATE_TIME, SourceRecord, source_record

if TYPE_CHECKING:
    from model.bundle import Bundle
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
    produce(iter(messages), TopicWriter(topic, kafka_client_options(settings.kafka)))
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


# Unit-test builders

# The headers a dead letter carries after the producer's own, in this order.
CALM_HEADERS = [
    "calm.error.reason",
    "calm.error.field",
    "calm.error.message",
    "calm.source.topic",
    "calm.source.partition",
    "calm.source.offset",
]


def iot_bytes(device: str, seq: int, ts_ms: int, value: float = 20.0) -> bytes:
    """One valid IoT reading (a single temperature metric) as the producer sends it."""
    reading = IotReading(
        device_id=device,
        site="lab",
        seq=seq,
        ts=from_millis(ts_ms),
        metrics=(Metric(name="temperature", value=value, unit="°C"),),
        firmware="1.0",
        status="ok",
    )
    return to_json_bytes(reading)


def transaction_bytes(txn: str, account: str, ts_ms: int) -> bytes:
    """One valid card payment in its wire form."""
    payment = Transaction(
        txn_id=txn,
        account_id=account,
        merchant="Corner Shop",
        category="grocery",
        amount=Decimal("12.50"),
        currency="EUR",
        ts=from_millis(ts_ms),
        country="DE",
        channel="pos",
        card_present=True,
    )
    return to_json_bytes(payment)


def polled(
    value: bytes | None,
    offset: int,
    timestamp_ms: int,
    *,
    topic: str = "iot",
    partition: int = 0,
    key: bytes | None = b"k",
    headers: Sequence[tuple[str, bytes | None]] = (),
    timestamp_type: int = CREATE_TIME,
) -> SourceRecord:
    """A record as a poll hands it over: a real `ConsumerRecord`, seen through `source_record`."""
    message = ConsumerRecord(
        topic=topic,
        partition=partition,
        leader_epoch=0,
        offset=offset,
        timestamp=timestamp_ms,
        timestamp_type=timestamp_type,
        key=key,
        value=value,
        headers=list(headers),
        checksum=None,
        serialized_key_size=-1 if key is None else len(key),
        serialized_value_size=-1 if value is None else len(value),
        serialized_header_size=-1,
    )
    return source_record(message)


def reading(device: str, seq: int, ts_ms: int, offset: int, **where: object) -> SourceRecord:
    """A valid reading polled at `offset`, its Kafka timestamp equal to its event time."""
    return polled(iot_bytes(device, seq, ts_ms), offset, ts_ms, **where)


# An untrained tiny bundle

TINY_VOCAB = 280


def export_untrained_bundle(root: Path, texts: list[str], name: str, version: str) -> Bundle:
    """Train a 280-entry BPE on `texts`, export a seeded random tiny CALM under `root`/out."""
    import torch

    from model.calm import CALM
    from model.config import AutoencoderConfig, BackboneConfig, CALMConfig
    from model.export import export_bundle
    from model.tokenizer import Tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer_path = root / "tokenizer.json"
    if not tokenizer_path.exists():
        Tokenizer.train(texts, TINY_VOCAB).save(tokenizer_path)
    config = CALMConfig(
        backbone=BackboneConfig(vocab_size=TINY_VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32),
        autoencoder=AutoencoderConfig(vocab_size=TINY_VOCAB, latent_dim=4, d_model=16, d_ff=32),
        noise_dim=4,
        head_layers=1,
    )
    return export_bundle(CALM(config), tokenizer_path, root / "out", name, version)


# Shared by several test modules (from test_events.py)

identifiers = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", fullmatch=True)


timestamps = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))]
    ),
)


metrics = st.builds(
    Metric,
    name=st.from_regex(r"[a-z][a-z_]{0,31}", fullmatch=True),
    value=st.floats(allow_nan=False, allow_infinity=False),
    unit=st.from_regex(r"[A-Za-z%/°]{1,8}", fullmatch=True),
)


readings = st.builds(
    IotReading,
    device_id=identifiers,
    site=identifiers,
    seq=st.integers(0, 2**63 - 1),
    ts=timestamps,
    metrics=st.lists(metrics, min_size=1, max_size=16, unique_by=lambda m: m.name).map(tuple),
    firmware=st.from_regex(r"[0-9A-Za-z.+-]{1,32}", fullmatch=True),
    status=st.sampled_from(["ok", "degraded", "fault"]),
)


transactions = st.builds(
    Transaction,
    txn_id=identifiers,
    account_id=identifiers,
    merchant=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9 &'.,_-]{0,63}", fullmatch=True),
    category=st.from_regex(r"[a-z][a-z_]{0,31}", fullmatch=True),
    amount=st.decimals(min_value=Decimal("0.0001"), max_value=Decimal(99999999999999), places=4),
    currency=st.from_regex(r"[A-Z]{3}", fullmatch=True),
    ts=timestamps,
    country=st.from_regex(r"[A-Z]{2}", fullmatch=True),
    channel=st.sampled_from(["pos", "ecom", "atm", "moto"]),
    card_present=st.booleans(),
)


events = st.one_of(readings, transactions)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def reading_payload(**changes: object) -> dict:
    obj = {
        "schema_version": 1,
        "kind": "iot",
        "device_id": "dev-0001",
        "site": "lyon-east",
        "seq": 7,
        "ts": "2025-01-06T10:00:00Z",
        "firmware": "2.4.1",
        "status": "ok",
        "metrics": [{"name": "temperature", "value": 21.5, "unit": "°C"}],
    }
    obj.update(changes)
    return obj


def payment_payload(**changes: object) -> dict:
    obj = {
        "schema_version": 1,
        "kind": "transaction",
        "txn_id": "tx-1",
        "account_id": "acct-00001",
        "merchant": "Corner Grocer",
        "category": "grocery",
        "amount": "12.30",
        "currency": "EUR",
        "ts": "2025-01-06T10:00:00Z",
        "country": "DE",
        "channel": "pos",
        "card_present": True,
    }
    obj.update(changes)
    return obj


# Shared by several test modules (from test_hostile_input.py)

INT64_MAX = 2**63 - 1


# The broker refuses timestamps far from its clock unless the topic allows them.
ANY_TIMESTAMP = {
    "message.timestamp.after.max.ms": str(INT64_MAX),
    "message.timestamp.before.max.ms": str(INT64_MAX),
}


def event_with(event, name: str, value: object) -> bytes:
    obj = json.loads(to_json_bytes(event))
    obj[name] = value
    return json.dumps(obj).encode()


def create_topics(settings: Settings, partitions: int = 1) -> None:
    """The iot topic (any timestamp allowed) and an empty transactions topic."""
    topics = settings.kafka.topics
    admin = KafkaAdminClient(**kafka_client_options(settings.kafka))
    admin.create_topics(
        [
            NewTopic(topics.iot, partitions, 1, topic_configs=ANY_TIMESTAMP),
            NewTopic(topics.transactions, 1, 1),
        ]
    )
    admin.close()


# Shared by several test modules (from test_pipeline_crash.py)

MESS = Mess(late=0.02, reordered=0.03, duplicate=0.02, malformed=0.02)


TAG = "CALM_TEST_RUN_TAG"  # not CALM_STREAM_*: those must be settings


def tagged_pids(tag: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if f"{TAG}={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def kill_all(tag: str, timeout_s: float = 60.0) -> None:
    """SIGKILL every process of the run, until none is left."""
    deadline = time.monotonic() + timeout_s
    while pids := tagged_pids(tag):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"processes {pids} survive SIGKILL"
        time.sleep(0.2)


class Run:
    """`calm-stream run --until-idle 1` from a config file, as a process tree of its own."""

    def __init__(self, config: Path, log: Path) -> None:
        self.tag = uuid.uuid4().hex
        env = {**os.environ, "CALM_STREAM_CONFIG": str(config), TAG: self.tag}
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "--until-idle", "1"],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout_s: float = 240.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            kill_all(self.tag)
            self.log.close()

    def kill(self) -> None:
        kill_all(self.tag)
        self.proc.wait()
        self.log.close()


def files(root: Path) -> int:
    return len(list((root / "results").glob("**/part-*.parquet")))


def wait_for(condition, what: str, run: Run, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert run.proc.poll() is None, f"the pipeline exited ({run.proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.1)


def write_config(path: Path, settings) -> Path:
    path.write_text(json.dumps(settings.model_dump(mode="json")))
    return path


# Shared by several test modules (from test_sinks.py)


@ray.remote
class Source:
    """Where a source actor stands: receives the durable keys."""

    def __init__(self) -> None:
        self.acked: list[list[str]] = []

    def acknowledge(self, keys: list[str]) -> None:
        self.acked.append(keys)

    def wait_for(self, count: int, timeout_s: float = 30.0) -> list[list[str]]:
        deadline = time.monotonic() + timeout_s
        while len(self.acked) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.acked
