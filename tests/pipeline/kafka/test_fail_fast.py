"""Failures a person can act on end a command with one line that names the setting and the cause:
no traceback, no secret. The commands run as subprocesses, against a real broker or a closed port;
settings that validate must also work (or fail at start, before anything runs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from pipeline.kafka.local_broker import LocalKafka

KAFKA_COMMANDS = [
    ["run", "--passthrough"],
    ["demo"],
    ["produce", "iot", "--count", "10"],
    ["bench", "produce", "--count", "10"],
]


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> CompletedProcess:
    """`calm-stream ARGS` in a subprocess with a clean CALM_STREAM_* environment plus `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("CALM_STREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--set", f"sinks.root={tmp_path / 'sink'}", *args],
        check=False,
        env=clean | (env or {}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """The output lines of `calm-stream ARGS`, which must fail without a traceback."""
    done = run_cli(tmp_path, *args, env=env)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output, output
    return output.strip().splitlines()


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def sasl(server: str, mechanism: str, user: str, password: str) -> list[str]:
    """--set flags for a SASL_PLAINTEXT client."""
    values = {
        "bootstrap_servers": server,
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_username": user,
        "sasl_password": password,
    }
    return [arg for name, value in values.items() for arg in ("--set", f"kafka.{name}={value}")]


@pytest.mark.parametrize("command", KAFKA_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_no_broker_at_the_bootstrap_server(tmp_path: Path, command: list[str]) -> None:
    server = closed_port()
    lines = cli(tmp_path, "--set", f"kafka.bootstrap_servers={server}", *command)
    assert len(lines) == 1, lines
    assert "kafka.bootstrap_servers" in lines[0] and server in lines[0]
    assert "no broker (connection refused)" in lines[0]
    assert "kafka.connect_timeout_seconds" in lines[0]


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
@pytest.mark.parametrize("command", [["run", "--passthrough"], ["produce", "iot"]], ids=" ".join)
def test_a_wrong_sasl_password(
    tmp_path: Path, sasl_kafka_broker: LocalKafka, mechanism: str, command: list[str]
) -> None:
    server, user = sasl_kafka_broker.sasl_bootstrap_servers, sasl_kafka_broker.sasl.username
    lines = cli(tmp_path, *sasl(server, mechanism, user, "hunter2-SECRET"), *command)
    assert len(lines) == 1, lines
    assert f"kafka.sasl_password: authentication failed for user {user} ({mechanism})" in lines[0]
    assert server in lines[0] and "hunter2" not in lines[0]


def test_a_plaintext_client_on_the_sasl_listener(
    tmp_path: Path, sasl_kafka_broker: LocalKafka
) -> None:
    server = sasl_kafka_broker.sasl_bootstrap_servers
    lines = cli(tmp_path, "--set", f"kafka.bootstrap_servers={server}", "run", "--passthrough")
    assert len(lines) == 1, lines
    assert "kafka.security_protocol" in lines[0] and server in lines[0]
    assert "wants SASL or TLS, not PLAINTEXT" in lines[0]


def test_a_sasl_client_on_a_plaintext_listener(tmp_path: Path, kafka_broker: LocalKafka) -> None:
    server = kafka_broker.bootstrap_servers
    lines = cli(tmp_path, *sasl(server, "PLAIN", "alice", "secret"), "bench", "produce")
    assert len(lines) == 1, lines
    assert "kafka.security_protocol: the listener does not speak SASL" in lines[0]
    assert server in lines[0]


def test_tls_against_a_plaintext_listener(tmp_path: Path, kafka_broker: LocalKafka) -> None:
    server = kafka_broker.bootstrap_servers
    lines = cli(
        tmp_path,
        "--set",
        f"kafka.bootstrap_servers={server}",
        "--set",
        "kafka.security_protocol=SSL",
        "demo",
    )
    assert len(lines) == 1, lines
    assert "kafka.security_protocol: TLS handshake failed" in lines[0] and server in lines[0]


# ---------------------------------------------------------------- settings that validate, then crash

BAD_SETTINGS = [
    # (flags, environment, words the one line must hold)
    (["--set", "windows.size_seconds=inf"], {}, ["windows.size_seconds", "finite"]),
    (["--set", "windows.size_seconds=0.0001"], {}, ["windows.size_seconds", "0.001"]),
    (["--set", "windows.allowed_lateness_seconds=inf"], {}, ["allowed_lateness_seconds"]),
    (["--set", "kafka.reconnect_timeout_seconds=0"], {}, ["kafka.reconnect_timeout_seconds"]),
    (["--set", "ray.resource_timeout_seconds=inf"], {}, ["ray.resource_timeout_seconds"]),
    (["--set", "windows.kind=sliding", "--set", "windows.slide_seconds=nan"], {}, ["slide"]),
    ([], {"CALM_STREAM_KAFKA": "garbage"}, ["CALM_STREAM_KAFKA", "CALM_STREAM_KAFKA__<FIELD>"]),
    ([], {"CALM_STREAM_KAFKA__GROUP_ID__TYPO": "x"}, ["CALM_STREAM_KAFKA__GROUP_ID__TYPO"]),
    (
        ["--set", "kafka.bootstrap_servers=user:hunter2-SECRET@host:9092"],
        {},
        ["kafka.bootstrap_servers", "not host:port"],
    ),
]


@pytest.mark.parametrize(("flags", "env", "words"), BAD_SETTINGS)
def test_bad_settings_are_one_line(
    tmp_path: Path, flags: list[str], env: dict[str, str], words: list[str]
) -> None:
    lines = cli(tmp_path, *flags, "settings", env=env)
    assert len(lines) == 1, lines
    assert all(word in lines[0] for word in words), lines[0]
    assert "hunter2" not in lines[0] and "garbage" not in lines[0]


@pytest.mark.parametrize(
    ("name", "body", "words"),
    [
        ("bad.yaml", "kafka:\n  group_id: x\n  topics: [iot\n", ["line 4"]),
        ("list.json", "[1, 2]", ["mapping of sections"]),
        ("bad.json", '{"kafka":\n  {"group_id": }}', ["line 2"]),
    ],
)
def test_a_malformed_config_file_is_one_line(
    tmp_path: Path, name: str, body: str, words: list[str]
) -> None:
    (tmp_path / name).write_text(body)
    lines = cli(tmp_path, "--config", str(tmp_path / name), "settings")
    assert len(lines) == 1, lines
    assert f"config file {tmp_path / name}" in lines[0]
    assert all(word in lines[0] for word in words), lines[0]


def test_the_local_brokers_password_variable_is_not_an_unknown_setting(tmp_path: Path) -> None:
    env = {"CALM_STREAM_LOCAL_KAFKA_SASL_PASSWORD": "calm-secret"}
    done = run_cli(tmp_path, "settings", "--json", env=env)
    assert done.returncode == 0, done.stderr


def test_a_metrics_port_in_use_is_named_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lines = cli(
            tmp_path,
            "--set",
            f"metrics.port={port}",
            "--set",
            f"kafka.bootstrap_servers={closed_port()}",
            "run",
            "--passthrough",
        )
    assert len(lines) == 1, lines
    assert f"metrics.port {port} on metrics.host 127.0.0.1" in lines[0]
    assert "or 0 to serve no metrics" in lines[0]


def test_a_sink_root_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    lines = cli(
        tmp_path,
        "--set",
        f"sinks.root={tmp_path / 'a-file' / 'below'}",
        "--set",
        "metrics.port=0",
        "--set",
        f"kafka.bootstrap_servers={closed_port()}",
        "run",
        "--passthrough",
    )
    assert lines == [f"error: sinks.root: {tmp_path / 'a-file'} is a file, not a directory"]


def test_actors_that_ask_for_more_cpus_than_the_local_ray_has_are_refused(tmp_path: Path) -> None:
    lines = cli(
        tmp_path,
        "--set",
        "ray.num_cpus=2",
        "--set",
        "ray.inference_actor_cpus=4",
        "--set",
        "metrics.port=0",
        "--set",
        f"kafka.bootstrap_servers={closed_port()}",
        "run",
        "--passthrough",
    )
    assert len(lines) == 1, lines
    assert "ray.inference_actor_cpus = 1 × 0.5 + 1 × 4 = 4.5 CPUs" in lines[0]
    assert "more than the 2 of the local Ray (ray.num_cpus)" in lines[0]


def join(broker: LocalKafka, *flags: str) -> list[str]:
    """--set flags for a run that joins the test's Ray cluster (2 CPUs, no autoscaler) with
    an inference actor of 4 CPUs."""
    import ray

    values = {
        "ray.address": ray.get_runtime_context().gcs_address,
        "ray.inference_actor_cpus": "4",
        "metrics.port": "0",
        "kafka.bootstrap_servers": broker.bootstrap_servers,
    }
    return [arg for name, value in values.items() for arg in ("--set", f"{name}={value}")]


def test_actors_a_cluster_may_place_later_wait_a_bounded_time_saying_so(
    tmp_path: Path, ray_local: None, kafka_broker: LocalKafka
) -> None:
    # No autoscaler said what it adds: nodes of 4 CPUs may come, the run waits for them.
    flags = join(kafka_broker)
    lines = cli(
        tmp_path, *flags, "--set", "ray.resource_timeout_seconds=12", "run", "--passthrough"
    )
    waits = [line for line in lines if "waiting for the Ray cluster to place 1 of 1" in line]
    assert waits and "(ray.resource_timeout_seconds)" in waits[0], lines
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]], lines  # one line, the last
    assert (
        "error: ray.resource_timeout_seconds=12: the Ray cluster placed 0 of 1 inference "
        in (errors[0])
    )
    assert "actors of 4 CPUs (ray.inference_actor_cpus)" in errors[0]
    assert "it has 2 CPUs in 1 nodes (largest 2)" in errors[0]


def test_actors_no_node_the_autoscaler_adds_can_hold_are_refused_at_start(
    tmp_path: Path, ray_local: None, kafka_broker: LocalKafka
) -> None:
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated.autoscaler_pb2 import ClusterConfig
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    # What an autoscaler (v2, KubeRay's) reports to the GCS: it adds up to 3 nodes of 2 CPUs.
    config = ClusterConfig()
    group = config.node_group_configs.add()
    group.resources["CPU"], group.max_count = 2, 3
    where = {"namespace": GCS_AUTOSCALER_STATE_NAMESPACE}
    _internal_kv_put(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, config.SerializeToString(), **where)
    try:
        lines = cli(tmp_path, *join(kafka_broker), "run", "--passthrough")
    finally:
        _internal_kv_del(GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, **where)
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]], lines
    assert (
        "error: ray.inference_actor_cpus=4: no node of the Ray cluster can ever hold" in (errors[0])
    )
    assert "it has 2 CPUs in 1 nodes (largest 2)" in errors[0]
    assert "its autoscaler adds nodes of up to 2 CPUs" in errors[0]
    assert not any("waiting for the Ray cluster" in line for line in lines)


def test_a_broker_away_is_waited_for_its_window_then_named_in_one_line() -> None:
    import pickle
    import time

    from kafka.errors import KafkaConnectionError

    from pipeline.kafka.check import BrokerWatch, KafkaUnavailable
    from pipeline.settings import KafkaSettings

    kafka = KafkaSettings(bootstrap_servers=["127.0.0.1:9"], reconnect_timeout_seconds=30)
    watch = pickle.loads(pickle.dumps(BrokerWatch(kafka, "source-0")))  # as it reaches its actor
    refused = KafkaConnectionError("111 ECONNREFUSED")
    watch.missed(refused, time.monotonic() - 29)  # away 29 s: within the window
    watch.reached()  # back: the clock starts again
    watch.missed(refused, time.monotonic() - 29)
    with pytest.raises(KafkaUnavailable) as lost:
        watch.missed(refused, time.monotonic() - 31)  # a request that began before it
    assert str(lost.value) == (
        "kafka.bootstrap_servers: no broker (connection refused) at 127.0.0.1:9 for 31 s mid-run "
        "(kafka.reconnect_timeout_seconds=30)"
    )
