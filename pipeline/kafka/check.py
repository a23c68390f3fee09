"""Fail fast when Kafka cannot be used: one bootstrap within `kafka.connect_timeout_seconds`, and
when it fails, the cause in one line that names the setting to fix. A broker that goes away
mid-run is waited for (`BrokerWatch`) for `kafka.reconnect_timeout_seconds`, then named the same way.

kafka-python retries a failed bootstrap until its deadline and then raises only "Unable to
bootstrap"; the causes it met on the way (refused, TLS, SASL) it merely logs. `check_kafka`
collects those logged errors while it bootstraps, keeps them off the console, and names them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from kafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailedError,
    UnsupportedSaslMechanismError,
)

from pipeline.kafka.clients import admin_client, kafka_client_options
from pipeline.settings import KafkaSettings, SettingsError

log = logging.getLogger(__name__)


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
            admin_client(options).close()
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


class BrokerWatch:
    """How long the clients of one actor have found no broker: a request that failed for want of
    one (kafka-python's retriable errors) starts the clock, one that succeeded stops it; once it
    ran for `kafka.reconnect_timeout_seconds`, KafkaUnavailable says why in one line. Meanwhile
    kafka-python's reconnect warnings are collected for that line, and two of ours say what
    happens (a broker restarted or rescheduled comes back within the window: the run goes on)."""

    def __init__(self, kafka: KafkaSettings, name: str) -> None:
        self.kafka, self.name = kafka, name
        self._since: float | None = None  # monotonic time of the first failed request
        self._errors: list[BaseException] = []
        self._muted = ExitStack()

    @property
    def request_timeout_ms(self) -> int:
        """How long one request may wait for an answer."""
        return round(self.kafka.connect_timeout_seconds * 1000)

    def reached(self) -> None:
        """A request was answered: the broker is (back) there."""
        if self._since is None:
            return
        log.warning(
            "%s: Kafka answers again after %.0f s; going on",
            self.name,
            time.monotonic() - self._since,
        )
        self._muted.close()
        self._since = None

    def missed(self, error: BaseException, started: float) -> None:
        """A request that began at `started` (monotonic) failed for want of a broker; raises
        KafkaUnavailable once none has answered for kafka.reconnect_timeout_seconds."""
        if self._since is None:
            self._since = started
            self._errors = self._muted.enter_context(_kafka_log_errors())
            log.warning(
                "%s: no Kafka broker answers at %s (%s); retrying for up to %g s "
                "(kafka.reconnect_timeout_seconds)",
                self.name,
                ", ".join(self.kafka.bootstrap_servers),
                _cause(self.kafka, [error])[1],
                self.kafka.reconnect_timeout_seconds,
            )
        self._since = min(self._since, started)  # a request under way since before counts
        self._errors.append(error)
        away = time.monotonic() - self._since
        if away >= self.kafka.reconnect_timeout_seconds:
            errors = list(self._errors)
            self._muted.close()
            raise KafkaUnavailable(lost(self.kafka, errors, away))

    def __getstate__(self) -> dict[str, object]:
        """Travels to its actor before any request: the settings and the name are all it holds."""
        return {"kafka": self.kafka, "name": self.name}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(**state)


def lost(kafka: KafkaSettings, errors: list[BaseException], seconds: float) -> str:
    """One line for a broker that went away mid-run and did not come back in time."""
    setting, cause = _cause(kafka, errors)
    servers = ", ".join(kafka.bootstrap_servers)
    return (
        f"{setting}: {cause} at {servers} for {seconds:.0f} s mid-run "
        f"(kafka.reconnect_timeout_seconds={kafka.reconnect_timeout_seconds:g})"
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
