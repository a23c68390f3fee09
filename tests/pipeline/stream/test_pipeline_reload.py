"""Hot reload: a new bundle version dropped into the registry while the stream runs is picked up
by the inference actors without a restart and recorded in the rows that it produced.
"""

from __future__ import annotations

import itertools
import shutil
import threading
import time

import pyarrow.compute as pc
from support import committed_offsets, pipeline_settings, read_back, tiny_registry

from model.bundle import Registry
from pipeline.kafka.clients import kafka_client_options
from pipeline.sim.producer import TopicWriter, produce
from pipeline.sim.simulator import simulate
from pipeline.stream.inference import row_seed
from pipeline.stream.job import JobOptions, ensure_topics, run_pipeline

RELOAD_CHECK_S = 0.5


def rows_of(root, version: str) -> int:
    results = read_back(root, "results")
    return (
        0 if results is None else pc.sum(pc.equal(results.column("model_version"), version)).as_py()
    )


def wait_for(condition, what: str, pipeline: threading.Thread, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert pipeline.is_alive(), f"the pipeline stopped before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.5)


def test_a_new_bundle_in_the_registry_serves_later_rows_without_a_restart(
    ray_local, kafka_broker, tmp_path_factory, tmp_path
):
    registry = tiny_registry(tmp_path_factory, versions=("1",))
    new_bundle = registry.parent.parent / "tiny-registry-cache" / "tiny-2"
    settings = pipeline_settings(kafka_broker.bootstrap_servers, tmp_path, registry, "reload")
    topic, sink = settings.kafka.topics.iot, tmp_path / "sink"
    ensure_topics(settings, [topic, settings.kafka.topics.transactions], partitions=2)
    client = kafka_client_options(settings.kafka)
    messages = simulate("iot", seed=8, entities=6).messages()
    produce(itertools.islice(messages, 600), TopicWriter(topic, client))

    stop, out = threading.Event(), {}
    pipeline = threading.Thread(
        target=lambda: out.setdefault(
            "report", run_pipeline(settings, JobOptions(reload_check_s=RELOAD_CHECK_S), stop)
        )
    )
    pipeline.start()
    try:
        wait_for(lambda: rows_of(sink, "1") > 0, "rows from version 1", pipeline)
        # Publish version 2 as a training job would: copy the bundle in, then move `latest`.
        shutil.copytree(new_bundle, registry / "tiny-2")
        Registry(registry).set_latest("tiny-2")
        # Any batch from now on comes more than one check interval after the move.
        time.sleep(2 * RELOAD_CHECK_S)
        second_half = {p: end for p, (_, end) in committed_offsets(settings, topic).items()}
        produce(itertools.islice(messages, 600), TopicWriter(topic, client))
        wait_for(lambda: rows_of(sink, "2") > 0, "rows from version 2", pipeline)
    finally:
        stop.set()
        pipeline.join()

    results = read_back(sink, "results").to_pylist()
    assert {r["model_version"] for r in results} == {"1", "2"}
    later = [r for r in results if r["first_offset"] >= second_half[r["partition"]]]
    assert later and all(r["model_version"] == "2" for r in later)  # windows of the new events
    for r in results:  # each row's noise came from its key and the version that served it
        assert r["seed"] == row_seed(r["key"], f"tiny-{r['model_version']}")
    assert out["report"].inference[0]["reloads"] == 1
