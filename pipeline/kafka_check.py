"""Fail fast when Kafka cannot be used: one bootstrap within `kafka.connect_timeout_seconds`, and
when it fails, the cause in one line that names the setting to fix.

kafka-python retries a failed bootstrap until its deadline and then raises only "Unable to
bootstrap"; the causes it met on the way (refused, TLS, SASL) it merely logs. `check_kafka`
collects those logged errors while it bootstraps, keeps them off the console, and names them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from kafka import KafkaAdminClient
from kafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailedError,
    UnsupportedSaslMechanismError,
)

from pipeline.settings import KafkaSettings, SettingsError, kafka_client_options


class KafkaUnavailable(SettingsError):
    """The settings name a Kafka that does not answer or does not let this client in."""


class _Collector(logging.Handler):
    """Keeps the exceptions that kafka-python's log records carry as arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        self.errors += [arg for arg in args if isinstance(arg, BaseException)]


@contextmanager
def _kafka_log_errors() -> Iterator[list[BaseException]]:
    """The errors kafka-python logs meanwhile; its log lines stay off the console (the one line
    that `describe` makes says it all)."""
    logger, collector = logging.getLogger("kafka"), _Collector()
    propagate, level = logger.propagate, logger.level
    logger.addHandler(collector)
    logger.propagate, logger.level = False, logging.WARNING
    try:
        yield collector.errors
    finally:
        logger.removeHandler(collector)
        logger.propagate, logger.level = propagate, level


def check_kafka(kafka: KafkaSettings) -> None:
    """Bootstrap a client as the pipeline's clients do, or raise KafkaUnavailable saying why."""
    options = kafka_client_options(kafka)
    with _kafka_log_errors() as errors:
        try:
            KafkaAdminClient(**options).close()
            return
        except KafkaError as error:
            errors.append(error)
    raise KafkaUnavailable(describe(kafka, errors))


def describe(kafka: KafkaSettings, errors: list[BaseException]) -> str:
    """One line: the setting to look at, what failed, where, and after how long."""
    setting, cause = _cause(kafka, errors)
    servers = ", ".join(kafka.bootstrap_servers)
    return (
        f"{setting}: {cause} at {servers} (kafka.connect_timeout_seconds="
        f"{kafka.connect_timeout_seconds:g})"
    )


def _cause(kafka: KafkaSettings, errors: list[BaseException]) -> tuple[str, str]:
    texts = " | ".join(str(error) for error in errors)
    user = f"user {kafka.sasl_username} ({kafka.sasl_mechanism})"
    sasl = kafka.security_protocol.startswith("SASL_")
    if any(isinstance(error, SaslAuthenticationFailedError) for error in errors):
        return "kafka.sasl_password", f"authentication failed for {user}"
    if "Handshake failed" in texts:
        reason = next(str(e) for e in errors if "Handshake failed" in str(e))
        detail = reason.split("Handshake failed:", 1)[1].strip()
        return "kafka.security_protocol", f"TLS handshake failed ({detail})"
    if any(isinstance(error, UnsupportedSaslMechanismError) for error in errors):
        return "kafka.sasl_mechanism", f"the broker does not enable {kafka.sasl_mechanism}"
    if any(isinstance(error, IllegalSaslStateError) for error in errors):
        return "kafka.security_protocol", "the listener does not speak SASL"
    if "ECONNREFUSED" in texts:
        return "kafka.bootstrap_servers", "no broker (connection refused)"
    if "DNS" in texts:
        return "kafka.bootstrap_servers", "no broker (host name not found)"
    if "socket disconnected" in texts and sasl:
        # A broker closes the connection right after credentials it refuses.
        return "kafka.sasl_password", f"authentication failed for {user}"
    if "socket disconnected" in texts:
        wants = f"its listener wants SASL or TLS, not {kafka.security_protocol}"
        return "kafka.security_protocol", f"the broker closed the connection: {wants}"
    return "kafka.bootstrap_servers", "no broker answered"
