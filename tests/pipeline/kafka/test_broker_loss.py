"""A broker that goes away mid-run: `calm-stream run` waits for it for
`kafka.reconnect_timeout_seconds`. Back in time, the run goes on and every window's row is written
exactly once; gone for longer, the run ends with one line naming the setting, the server and the
cause, and a run after the broker's return completes the output, again exactly once.

The broker is the test's own (the session's is shared): halted (SIGTERM, its data and listeners
kept) while results are being written and the input is not read to its end, then resumed on the
same port, as a restarted or rescheduled broker comes back. Each run is a driver process joining
the test's Ray, as in the crash tests; rows are read back from Parquet with pyarrow alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
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

from pipeline.kafka.local_broker import LocalKafka
from pipeline.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalKafka]:
    """A broker of this module's own: its tests halt it."""
    with LocalKafka() as own:
        yield own


def loss_settings(broker: LocalKafka, tmp_path: Path, registry: Path, name: str, patience: float):
    """Slow enough that the input is far from read when the first results are durable."""
    slow = {
        "kafka": {"poll_max_records": 25, "reconnect_timeout_seconds": patience},
        "ray": {"address": ray.get_runtime_context().gcs_address, "queue_max_batches": 1},
        "model": {"batch_token_budget": 64},
        "sinks": {"rotate_seconds": 0.3},
    }
    settings = pipeline_settings(broker.bootstrap_servers, tmp_path, registry, name, **slow)
    send(settings, "iot", 1500, seed=7, entities=8, mess=MESS)
    send(settings, "transactions", 300, seed=8, entities=20, mess=MESS)
    return settings


def read_to_the_end(settings: Settings) -> bool:
    topics = settings.kafka.topics
    return all(
        offset == end
        for topic in (topics.iot, topics.transactions)
        for offset, end in committed_offsets(settings, topic).values()
    )


def assert_exactly_once(settings: Settings) -> None:
    """Every window's row and every dead letter once in Parquet; every offset committed."""
    topics, sink = settings.kafka.topics, Path(settings.sinks.root)
    references = [reference_windows(settings, t) for t in (topics.iot, topics.transactions)]
    keys = read_back(sink, "results").column("key").to_pylist()
    assert len(keys) == len(set(keys)), "a window's row was written twice"
    assert set(keys) == {key for windows, _ in references for key in windows}
    letters = read_back(sink, "dlq").column("key").to_pylist()
    assert len(letters) == len(set(letters)), "a dead letter was written twice"
    assert len(letters) == sum(sum(reasons.values()) for _, reasons in references)
    assert read_to_the_end(settings)


def halt_while_results_are_written(broker: LocalKafka, settings: Settings, run: Run) -> None:
    wait_for(lambda: files(Path(settings.sinks.root)) > 0, "a results file", run)
    assert not read_to_the_end(settings)  # the broker goes away mid-run
    broker.halt()


def test_a_broker_back_within_the_window_loses_and_repeats_nothing(
    ray_local, broker, tmp_path_factory, tmp_path
):
    registry = tiny_registry(tmp_path_factory)
    settings = loss_settings(broker, tmp_path, registry, "back", patience=120)
    log = tmp_path / "run.log"
    run = Run(write_config(tmp_path / "settings.json", settings), log)
    halt_while_results_are_written(broker, settings, run)
    time.sleep(10)  # beyond the clients' request timeout (kafka.connect_timeout_seconds, 6 s)
    assert run.proc.poll() is None, log.read_text()[-3000:]  # waiting, not failed
    broker.resume()
    assert run.wait() == 0, log.read_text()[-3000:]

    output = log.read_text()
    assert "Traceback" not in output, output[-3000:]
    assert "no Kafka broker answers at" in output  # visible while it waits ...
    assert "retrying for up to 120 s (kafka.reconnect_timeout_seconds)" in output
    assert "Kafka answers again after" in output  # ... and when it goes on
    assert_exactly_once(settings)


def test_a_broker_gone_longer_ends_the_run_in_one_line_and_a_rerun_completes_it(
    ray_local, broker, tmp_path_factory, tmp_path
):
    registry = tiny_registry(tmp_path_factory)
    settings = loss_settings(broker, tmp_path, registry, "gone", patience=8)
    config, log = write_config(tmp_path / "settings.json", settings), tmp_path / "run.log"
    run = Run(config, log)
    halt_while_results_are_written(broker, settings, run)
    halted = time.monotonic()
    try:
        code = run.wait()
    finally:
        broker.resume()
    waited = time.monotonic() - halted

    output = log.read_text()
    assert code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    server = broker.bootstrap_servers
    assert errors == [output.strip().splitlines()[-1]], output[-3000:]  # one line, the last
    assert (
        f"error: kafka.bootstrap_servers: no broker (connection refused) at {server}" in errors[0]
    )
    assert "mid-run (kafka.reconnect_timeout_seconds=8)" in errors[0]
    assert waited >= 8  # the window was honoured

    assert Run(config, tmp_path / "rerun.log").wait() == 0, (tmp_path / "rerun.log").read_text()
    assert_exactly_once(settings)
