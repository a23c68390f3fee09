"""The streaming job: source actors -> bounded queue -> inference actors -> sink, on one Ray.

`run_pipeline` starts every actor from the settings, waits, and shuts down in the order that
keeps the delivery promise: sources stop polling and wait until everything they handed over is
durable (inference and sink keep running meanwhile), commit, and leave; then the inference actors
finish their batch in hand; then the sink commits its buffers and releases its root. Open windows
are not fired on a stop: they hold the committed offsets back and are rebuilt on the next start.
With `until_idle_s` the input is bounded: each source stops once its partitions are read to the
end and quiet for that long, and fires its open windows first (the input is over).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import ray
from kafka import TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from model.bundle import Registry
from operators.events import from_millis
from operators.windows import WindowSpec
from pipeline.kafka import clients
from pipeline.kafka.check import BrokerWatch, KafkaUnavailable, check_kafka
from pipeline.kafka.clients import (
    kafka_client_options,
    kafka_consumer_options,
    kafka_producer_options,
)
from pipeline.kafka.positions import decode_watermark
from pipeline.settings import MetricsSettings, RaySettings, Settings, SettingsError
from pipeline.sinks.files import local_root
from pipeline.sinks.metrics import MetricsReporter
from pipeline.sinks.sink import SinkActor
from pipeline.stream.dlq import DeadLetterWriter
from pipeline.stream.flow import FlowConfig, WindowStage
from pipeline.stream.inference import InferenceActor
from pipeline.stream.runtime import check_actors_fit, init_ray, local_ray_cpus, wait_placed
from pipeline.stream.source import KafkaSourceActor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOptions:
    passthrough: bool = False  # the model switched off: stream, windows and sinks only
    until_idle_s: float | None = None  # bounded input: stop once read to the end and quiet
    slowdown_s: float = 0.0  # extra seconds per inference batch (tests of backpressure)
    reload_check_s: float = 2.0  # how often inference actors look at the registry's `latest`
    drain_timeout_s: float = 300.0


@dataclass
class JobReport:
    seconds: float
    sources: list[dict[str, Any]]
    inference: list[dict[str, Any]]
    sink: dict[str, int]
    paths: dict[str, str]
    # (newest Kafka record of the window, row committed), epoch seconds, per result row
    commit_times: list[tuple[float, float]] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(s["records"] for s in self.sources)

    @property
    def tokens_out(self) -> int:
        return sum(i["tokens_out"] for i in self.inference)

    @property
    def processing_seconds(self) -> float:
        """From the poll that brought the first record to the last commit, minus the quiet time
        that detected the end of a bounded input (the slowest source decides)."""
        starts = [s["first_record_at"] for s in self.sources if "first_record_at" in s]
        if not starts:
            return float("nan")
        return max(s["finished_at"] - s["idle_wait_s"] for s in self.sources) - min(starts)


def window_spec(settings: Settings) -> WindowSpec:
    w = settings.windows
    return WindowSpec.from_seconds(
        w.size_seconds, w.slide_seconds, w.watermark_delay_seconds, w.allowed_lateness_seconds
    )


def ensure_topics(settings: Settings, names: list[str], partitions: int = 1) -> None:
    """Create the topics that do not exist yet (the dead-letter and late topics, the demo's)."""
    admin = clients.admin_client(kafka_client_options(settings.kafka))
    try:
        missing = set(names) - set(admin.list_topics())
        for name in sorted(missing):
            try:
                admin.create_topics([NewTopic(name, partitions, 1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def replay_floor(settings: Settings, spec: WindowSpec) -> datetime | None:
    """The earliest window start that a replay from the group's committed offsets can still fire:
    each partition resumes with its committed watermark, on which the windows up to
    `spec.last_closed_start` are closed. None when an input partition has no committed
    watermark (a fresh group: everything may replay)."""
    topics = settings.kafka.topics
    consumer = clients.consumer(
        kafka_client_options(settings.kafka),
        group_id=settings.kafka.group_id,
        enable_auto_commit=False,
    )
    watermarks: list[int | None] = []
    try:
        for topic in (topics.iot, topics.transactions):
            for partition in sorted(consumer.partitions_for_topic(topic) or ()):
                committed = consumer.committed(TopicPartition(topic, partition), metadata=True)
                watermarks.append(decode_watermark(committed.metadata) if committed else None)
    finally:
        consumer.close(autocommit=False)
    if not watermarks or None in watermarks:
        return None
    return from_millis(spec.last_closed_start(min(watermarks)) + 1)


def request_flush(sink: ray.actor.ActorHandle) -> None:
    """A draining source's call: the sink commits what it buffered now, not at its next rotation
    (without waiting for it: the source keeps reading acks meanwhile)."""
    sink.flush.remote()


def node_shares(nodes: list[str]) -> list[float]:
    """Each inference actor's share of its node: the node's price is spread over its actors."""
    counts = Counter(nodes)
    return [1.0 / counts[node] for node in nodes]


def preflight(settings: Settings, options: JobOptions) -> None:
    """What would fail inside an actor, or after minutes, fails here, naming the setting."""
    _check_sink_root(settings.sinks.root)
    if not options.passthrough:
        registry = Registry(settings.model.registry)
        registry.open(registry.resolve(settings.model.bundle_version))
    _check_metrics_port(settings.metrics)
    _check_local_ray_fits(settings.ray)
    check_kafka(settings.kafka)


def _check_sink_root(root: str) -> None:
    path = local_root(root)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise SettingsError(f"sinks.root: {existing} is a file, not a directory")


def _check_local_ray_fits(settings: RaySettings) -> None:
    """A local Ray has a fixed number of CPUs and no autoscaler: actors that ask for more than it
    has would wait for ever. (A Ray that runs already, or a cluster, is checked once joined:
    runtime.check_actors_fit, and wait_placed bounds the wait for an autoscaler.)"""
    cpus = None if ray.is_initialized() else local_ray_cpus(settings)
    sources, inference = settings.source_actors, settings.inference_actors
    need = sources * settings.source_actor_cpus + inference * settings.inference_actor_cpus
    if cpus is not None and need > cpus + 1e-9:
        raise SettingsError(
            "ray.source_actors × ray.source_actor_cpus + ray.inference_actors × "
            f"ray.inference_actor_cpus = {sources} × {settings.source_actor_cpus:g} + "
            f"{inference} × {settings.inference_actor_cpus:g} = {need:g} CPUs, more than the "
            f"{cpus} of the local Ray (ray.num_cpus): the actors would wait for ever"
        )


def _check_metrics_port(metrics: MetricsSettings) -> None:
    """The sink serves metrics on the driver's node, this one: the port must be free here."""
    if metrics.port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in metrics.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server does
        try:
            probe.bind((metrics.host, metrics.port))
        except OSError as error:
            raise SettingsError(
                f"metrics.port {metrics.port} on metrics.host {metrics.host}: {error.strerror} "
                "(another calm-stream run?); choose a free port, or 0 to serve no metrics"
            ) from None


def run_pipeline(
    settings: Settings, options: JobOptions = JobOptions(), stop: threading.Event | None = None
) -> JobReport:
    """Run until `stop` is set (or the bounded input is done); see the module docstring."""
    producer, consumer = (
        kafka_producer_options(settings.kafka),
        kafka_consumer_options(settings.kafka),
    )
    preflight(settings, options)
    init_ray(settings.ray)
    check_actors_fit(settings.ray)
    topics = settings.kafka.topics
    ensure_topics(settings, [topics.dlq, topics.late])
    started = time.monotonic()
    p, r = settings.ray.source_actors, settings.ray.inference_actors
    requests = Queue(maxsize=settings.ray.queue_max_batches, actor_options={"num_cpus": 0})
    # On the driver's node: the metrics endpoint (and the sink volume) live where the chart's
    # Service and ServiceMonitor look, on the Ray head that runs `calm-stream run`.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    spec = window_spec(settings)
    sink = SinkActor.options(num_cpus=0, scheduling_strategy=here).remote(
        settings.sinks.root,
        settings.sinks.rotate_rows,
        settings.sinks.rotate_seconds,
        settings.metrics.host,
        settings.metrics.port,
        window_spec=spec,
        windows_since=replay_floor(settings, spec),
    )
    actors: list[ray.actor.ActorHandle] = [requests.actor, sink]
    try:
        paths = ray.get(sink.paths.remote())  # the root is usable and locked by this job
        inference = [
            InferenceActor.options(num_cpus=settings.ray.inference_actor_cpus).remote(
                f"inference-{i}",
                requests,
                sink,
                settings.model,
                settings.pricing,
                passthrough=options.passthrough,
                reload_check_s=options.reload_check_s,
                slowdown_s=options.slowdown_s,
            )
            for i in range(r)
        ]
        actors += inference
        shares = node_shares(
            wait_placed(
                [a.node_id.remote() for a in inference],
                f"inference actors of {settings.ray.inference_actor_cpus:g} CPUs "
                "(ray.inference_actor_cpus)",
                settings.ray,
            )
        )
        sources = [
            KafkaSourceActor.options(num_cpus=settings.ray.source_actor_cpus).remote(
                [topics.iot, topics.transactions],
                settings.kafka.group_id,
                consumer,
                requests,
                max_records=settings.kafka.poll_max_records,
                poll_timeout_ms=settings.kafka.poll_timeout_ms,
                stage=WindowStage(
                    FlowConfig(
                        spec,
                        topics.iot,
                        topics.transactions,
                        topics.dlq,
                        topics.late,
                        settings.kafka.max_message_bytes,
                        i,
                        settings.windows.future_timestamp_clock,
                        timedelta(seconds=settings.windows.max_future_skew_seconds),
                    )
                ),
                dead_letters=partial(DeadLetterWriter, producer, sink, i),
                report=MetricsReporter(sink, requests),
                name=f"source-{i}",
                group_instance_id=f"{settings.kafka.group_id}-source-{i}",
                flush_downstream=partial(request_flush, sink),
                watch=BrokerWatch(settings.kafka, f"source-{i}"),
            )
            for i in range(p)
        ]
        actors += sources
        ray.get(sink.connect.remote(sources))  # before any source runs: acks find their way
        # Sources start polling together, so the group forms once: a source that joined late
        # could find a finished (static, so never leaving) member holding up the rebalance.
        wait_placed(
            [s.__ray_ready__.remote() for s in sources],
            f"source actors of {settings.ray.source_actor_cpus:g} CPUs (ray.source_actor_cpus)",
            settings.ray,
        )
        serving = [a.run.remote(share) for a, share in zip(inference, shares)]
        consuming = [
            s.run.remote(
                max_idle_seconds=options.until_idle_s,
                flush_at_end=options.until_idle_s is not None,
                drain_timeout_s=options.drain_timeout_s,
                close_at_end=True,
            )
            for s in sources
        ]
        _wait(consuming, serving, sources, stop)
        source_stats = ray.get(consuming)
        for actor in inference:
            actor.stop.remote()
        inference_stats = ray.get(serving)
        commit_times = ray.get(sink.commit_times.remote())
        sink_stats = ray.get(sink.close.remote())
        return JobReport(
            time.monotonic() - started,
            source_stats,
            inference_stats,
            sink_stats,
            paths,
            commit_times,
        )
    finally:
        for actor in actors:
            ray.kill(actor)


def _wait(
    consuming: list[ray.ObjectRef],
    serving: list[ray.ObjectRef],
    sources: list[ray.actor.ActorHandle],
    stop: threading.Event | None,
) -> None:
    """Until every source returned; a failed actor fails the job, `stop` starts the drain. A source
    that gave up on a broker gone for good raises its one line (KafkaUnavailable) here."""
    pending, stopping = list(consuming), False
    while pending:
        done, pending = ray.wait(pending, timeout=0.5)
        try:
            ray.get(done)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, KafkaUnavailable):
                raise error.cause from None
            raise
        failed, _ = ray.wait(serving, timeout=0)
        if failed:
            ray.get(failed)
            raise RuntimeError("an inference actor stopped while the sources were running")
        if stop is not None and stop.is_set() and not stopping:
            log.info("stopping: draining in-flight work, then committing")
            for source in sources:
                source.stop.remote()
            stopping = True
