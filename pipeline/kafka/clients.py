"""Every kafka-python client the pipeline makes, and the one translation from the settings to
their options (bootstrap servers, security, timeouts), so that a consumer, a producer and an admin
client built anywhere in the package talk to Kafka the same way.

The options are plain dicts because they travel: an actor gets them pickled and builds its own
client there (a client never crosses processes). Each constructor adds only what its role needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from pipeline.settings import KafkaSettings, SettingsError

ClientOptions = Mapping[str, Any]


def kafka_client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments for kafka-python clients (producer, consumer, admin) from the settings."""
    if not kafka.bootstrap_servers:
        raise SettingsError("kafka.bootstrap_servers is empty: set it or use `calm-stream demo`")
    options: dict[str, Any] = {
        "bootstrap_servers": list(kafka.bootstrap_servers),
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
        "bootstrap_timeout_ms": round(kafka.connect_timeout_seconds * 1000),
        # A broker that went away is looked for every second: kafka-python's default backs off to
        # 30 s between tries, and left a broker that came back unused for that long.
        "reconnect_backoff_max_ms": 1000,
    }
    if kafka.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.sasl_username
        options["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options.update(
            {
                "ssl_cafile": str(kafka.ssl_cafile) if kafka.ssl_cafile else None,
                "ssl_certfile": str(kafka.ssl_certfile) if kafka.ssl_certfile else None,
                "ssl_keyfile": str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None,
                "ssl_password": kafka.ssl_password.get_secret_value()
                if kafka.ssl_password
                else None,
            }
        )
    return options


def kafka_consumer_options(kafka: KafkaSettings) -> dict[str, Any]:
    """`kafka_client_options` plus what only a consumer takes."""
    return kafka_client_options(kafka) | {"fetch_max_wait_ms": kafka.fetch_max_wait_ms}


def kafka_producer_options(kafka: KafkaSettings) -> dict[str, Any]:
    """`kafka_client_options` for a producer inside a run: a send may wait for a broker that went
    away (and a record may stay undelivered) as long as the run waits for it."""
    patience_ms = round((kafka.reconnect_timeout_seconds + kafka.connect_timeout_seconds) * 1000)
    return kafka_client_options(kafka) | {
        "max_block_ms": patience_ms,
        # kafka-python wants at least its request timeout (30 s) plus the linger time
        "delivery_timeout_ms": patience_ms + 31_000,
    }


def admin_client(options: ClientOptions) -> KafkaAdminClient:
    """An admin client (topics, the bootstrap check); close it when done."""
    return KafkaAdminClient(**options)


def consumer(options: ClientOptions, **role: Any) -> KafkaConsumer:
    """A consumer with `options` plus its role's own (group, offsets, auto-commit)."""
    return KafkaConsumer(**options, **role)


def producer(options: ClientOptions, **role: Any) -> KafkaProducer:
    """A producer with `options` plus its role's own (acks, batching)."""
    return KafkaProducer(**options, **role)
