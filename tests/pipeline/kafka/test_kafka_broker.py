"""The local Apache Kafka broker (pipeline/kafka/local_broker.py) against kafka-python: consumer-group
resume without loss or duplicates, the SASL listener, and the CLI's named-broker life cycle."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka.structs import OffsetAndMetadata
from typer.testing import CliRunner

from pipeline.cli.kafka import kafka_app
from pipeline.kafka import local_broker
from pipeline.kafka.local_broker import KafkaBrokerError, LocalKafka, SaslUser

MESSAGES = 10_000
PARTITIONS = 3
HALF = MESSAGES // 2

Record = tuple[str, int]  # (key, sequence number in the value)


def encode(record: Record) -> tuple[bytes, bytes]:
    key, seq = record
    return key.encode(), json.dumps({"seq": seq}).encode()


def produce(bootstrap: str, topic: str, compression: str) -> list[Record]:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, compression_type=compression, linger_ms=20
    )
    sent = [(f"device-{seq % 97}", seq) for seq in range(MESSAGES)]
    for record in sent:
        key, value = encode(record)
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()
    return sent


def stored_bytes(bootstrap: str, topic: str) -> int:
    """Size of the topic's log segments on the broker's disk (DescribeLogDirs)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    brokers = admin.describe_log_dirs(topic_partitions=[topic])
    admin.close()
    return sum(
        partition["partition_size"]
        for broker in brokers
        for log_dir in broker["log_dirs"]
        for stored in log_dir["topics"]
        if stored["name"] == topic
        for partition in stored["partitions"]
    )


def group_consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    consumer.subscribe([topic])
    return consumer


def record_of(message) -> Record:
    return message.key.decode(), json.loads(message.value)["seq"]


def consume_half_then_commit(bootstrap: str, topic: str, group: str) -> list[Record]:
    """Process exactly HALF records, commit the offset after the last processed one of each
    partition (not what poll() fetched beyond it), and leave the group."""
    consumer = group_consumer(bootstrap, topic, group)
    processed: list[Record] = []
    next_offsets: dict[TopicPartition, OffsetAndMetadata] = {}
    deadline = time.monotonic() + 120
    while len(processed) < HALF and time.monotonic() < deadline:
        for tp, messages in consumer.poll(timeout_ms=1000).items():
            for message in messages:
                if len(processed) == HALF:
                    break
                processed.append(record_of(message))
                next_offsets[tp] = OffsetAndMetadata(message.offset + 1, "", -1)
    consumer.commit(next_offsets)
    consumer.close(autocommit=False)
    return processed


def consume_to_end(bootstrap: str, topic: str, group: str) -> list[Record]:
    """Resume the group in a new consumer and read until every partition is at its end."""
    consumer = group_consumer(bootstrap, topic, group)
    ends = consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
    assert sum(ends.values()) == MESSAGES
    received: list[Record] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (
        not consumer.assignment() or any(consumer.position(tp) < end for tp, end in ends.items())
    ):
        for messages in consumer.poll(timeout_ms=1000).values():
            received.extend(record_of(message) for message in messages)
    consumer.commit()
    consumer.close(autocommit=False)
    return received


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_group_resumes_after_manual_commit_without_loss_or_duplicates(
    kafka_broker, topic_factory, compression
):
    topic = topic_factory(partitions=PARTITIONS)
    group = f"{topic}-group"
    sent = produce(kafka_broker.bootstrap_servers, topic, compression)
    # Uncompressed batches take more than the bare keys and values (~1.3x); lz4 ~0.6x, zstd ~0.35x.
    assert stored_bytes(kafka_broker.bootstrap_servers, topic) < sum(
        len(key) + len(value) for key, value in map(encode, sent)
    )

    first = consume_half_then_commit(kafka_broker.bootstrap_servers, topic, group)
    rest = consume_to_end(kafka_broker.bootstrap_servers, topic, group)

    assert len(first) == HALF
    assert Counter(first) + Counter(rest) == Counter(sent)  # nothing lost, nothing twice
    assert not set(first) & set(rest)
    # A key lives in one partition, so across the hand-over its records stay in send order.
    by_key: dict[str, list[int]] = defaultdict(list)
    for key, seq in first + rest:
        by_key[key].append(seq)
    assert all(seqs == sorted(seqs) for seqs in by_key.values())


# ---------------------------------------------------------------- SASL listener


def sasl_options(user: SaslUser, mechanism: str, password: str | None = None) -> dict:
    return {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": user.username,
        "sasl_plain_password": user.password if password is None else password,
    }


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_sasl_client_produces_and_consumes(sasl_kafka_broker, mechanism):
    options = {
        "bootstrap_servers": sasl_kafka_broker.sasl_bootstrap_servers,
        **sasl_options(sasl_kafka_broker.sasl, mechanism),
    }
    topic = f"sasl-{mechanism.lower()}"
    admin = KafkaAdminClient(**options)
    admin.create_topics(
        {topic: {"num_partitions": 1, "replication_factor": 1}}, wait_for_metadata=True
    )
    admin.close()
    producer = KafkaProducer(**options)
    for i in range(20):
        producer.send(topic, key=b"k", value=str(i).encode())
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(topic, auto_offset_reset="earliest", **options)
    values: list[int] = []
    deadline = time.monotonic() + 60
    while len(values) < 20 and time.monotonic() < deadline:
        for messages in consumer.poll(timeout_ms=1000).values():
            values.extend(int(message.value) for message in messages)
    consumer.close()
    assert values == list(range(20))


def refused(broker: LocalKafka, options: dict) -> str:
    """Try to bootstrap a producer with `options`; return what the broker logged meanwhile."""
    log_before = len(broker.log_text())
    with pytest.raises(KafkaTimeoutError, match="Unable to bootstrap"):
        KafkaProducer(
            bootstrap_servers=broker.sasl_bootstrap_servers, bootstrap_timeout_ms=3000, **options
        )
    return broker.log_text()[log_before:]


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
def test_sasl_listener_refuses_a_wrong_password(sasl_kafka_broker, mechanism):
    logged = refused(sasl_kafka_broker, sasl_options(sasl_kafka_broker.sasl, mechanism, "wrong"))
    assert re.search(
        r"Failed authentication with /127\.0\.0\.1 .*(Invalid username or password"
        r"|invalid credentials with SASL mechanism SCRAM-SHA-256)",
        logged,
    )


def test_sasl_listener_refuses_a_client_without_credentials(sasl_kafka_broker):
    logged = refused(sasl_kafka_broker, {})
    assert re.search(r"Unexpected Kafka request of type \w+ during SASL handshake", logged)


def command_lines() -> list[str]:
    """The argv of every process on this machine, as `ps` shows them to any user."""
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # the process ended meanwhile
            pass
    return lines


@pytest.mark.integration
def test_the_sasl_password_is_in_no_command_line_while_the_broker_starts():
    user = SaslUser("argv-user", f"argv-{uuid.uuid4().hex}")
    broker = LocalKafka(sasl=user)
    starting = threading.Thread(target=broker.start)
    starting.start()
    shown: list[str] = []
    while starting.is_alive():
        shown += [line for line in command_lines() if user.password in line]
    try:
        assert broker.pid and shown == []
        # SCRAM still accepts the user, whose credentials no longer come from the format's argv.
        options = sasl_options(user, "SCRAM-SHA-256")
        KafkaAdminClient(bootstrap_servers=broker.sasl_bootstrap_servers, **options).close()
    finally:
        broker.stop()


def test_the_cli_refuses_a_sasl_password_on_its_command_line():
    name = f"pytest-{uuid.uuid4().hex[:8]}"  # with --timeout 0 a broker started by mistake stops
    args = ["start", "--name", name, "--timeout", "0", "--sasl-user", "alice"]
    refused = CliRunner().invoke(kafka_app, [*args, "--sasl-password", "hunter2"])
    assert refused.exit_code == 2
    assert "CALM_STREAM_LOCAL_KAFKA_SASL_PASSWORD" in refused.output
    assert "--sasl-password-file" in refused.output


def test_sasl_user_rejects_values_that_would_break_the_broker_config():
    with pytest.raises(ValueError, match="username"):
        SaslUser("bad user", "secret")
    with pytest.raises(ValueError, match="password"):
        SaslUser("alice", 'pa"ss')
    with pytest.raises(ValueError, match="mechanisms"):
        SaslUser("alice", "secret", mechanisms=("GSSAPI",))


# ---------------------------------------------------------------- the CLI's named broker


@pytest.mark.integration
def test_cli_start_status_stop_of_a_named_broker():
    runner, name = CliRunner(), f"pytest-{uuid.uuid4().hex[:8]}"

    assert runner.invoke(kafka_app, ["status", "--name", name]).exit_code == 1
    started = runner.invoke(kafka_app, ["start", "--name", name])
    try:
        assert started.exit_code == 0, started.output
        state = local_broker.read_state(name)
        assert state is not None and state.bootstrap_servers in started.output
        admin = KafkaAdminClient(bootstrap_servers=state.bootstrap_servers)
        admin.create_topics({"cli-topic": {"num_partitions": 1, "replication_factor": 1}})
        assert "cli-topic" in admin.list_topics()
        admin.close()

        again = runner.invoke(kafka_app, ["start", "--name", name])
        assert again.exit_code == 1 and "already running" in again.output

        shown = runner.invoke(kafka_app, ["status", "--name", name, "--json"])
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.output)["running"] is True
    finally:
        stopped = runner.invoke(kafka_app, ["stop", "--name", name])
    assert stopped.exit_code == 0 and "stopped" in stopped.output
    assert not local_broker.pid_alive(state.pid)
    assert local_broker.read_state(name) is None
    assert runner.invoke(kafka_app, ["status", "--name", name]).exit_code == 1


def test_cli_rejects_a_bad_broker_name_and_half_sasl_options():
    runner = CliRunner()
    bad_name = runner.invoke(kafka_app, ["status", "--name", "../etc"])
    assert bad_name.exit_code == 2 and "broker name" in bad_name.output
    half = runner.invoke(kafka_app, ["start", "--sasl-user", "alice"])
    assert half.exit_code == 2 and "go together" in half.output


@pytest.mark.integration
def test_a_broker_that_does_not_serve_in_time_is_stopped_and_removed():
    broker = LocalKafka(startup_timeout_s=0)
    with pytest.raises(KafkaBrokerError, match=r"did not serve within 0 s; .*broker\.log"):
        broker.start()
    assert not broker.workdir.exists()
    with pytest.raises(KafkaBrokerError, match="not running"):
        _ = broker.pid  # the JVM was stopped


def test_missing_maven_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty cache: the jars must be fetched
    monkeypatch.setenv("PATH", str(tmp_path))  # but mvn is not there
    with pytest.raises(KafkaBrokerError, match=r"Maven \(mvn\) is not on PATH"):
        LocalKafka().start()


@pytest.mark.integration
def test_missing_java_is_a_clear_error(tmp_path, monkeypatch):
    local_broker.fetch_jars()  # cached jars: only java is missing
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KafkaBrokerError, match=r"Java \(17 or newer\) is not on PATH"):
        LocalKafka().start()


def test_a_cluster_id_that_starts_with_a_dash_still_formats(monkeypatch):
    """One base64url id in 64 starts with "-"; kafka-storage must not read it as a flag."""
    monkeypatch.setattr(local_broker, "_cluster_id", lambda: "-" + "A" * 21)
    with LocalKafka() as broker:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        try:
            assert admin.describe_cluster()["cluster_id"] == "-" + "A" * 21
        finally:
            admin.close()
