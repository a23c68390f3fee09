"""Failures a person can act on end a command with one line that names the setting and the cause:
no traceback, no secret. The commands run as subprocesses, against a real broker or a closed port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.local_kafka import LocalKafka

KAFKA_COMMANDS = [
    ["run", "--passthrough"],
    ["demo"],
    ["produce", "iot", "--count", "10"],
    ["bench", "produce", "--count", "10"],
]


def cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """Run `calm-stream ARGS` with a clean CALM_STREAM_* environment; its output lines when it
    failed (the test fails when it succeeded, or printed a traceback)."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("CALM_STREAM_")}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--set", f"sinks.root={tmp_path / 'sink'}", *args],
        check=False,
        env=clean | (env or {}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
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
