"""The one settings model of calm-stream.

Values come, lowest precedence first, from: the defaults below, an optional config file (YAML, TOML
or JSON; `--config FILE` or `CALM_STREAM_CONFIG`), environment variables `CALM_STREAM_<SECTION>__<FIELD>`,
and CLI flags (`--set section.field=value`). `load_settings` is the only way the program builds one:
it turns every problem into a `SettingsError` that names the setting, where its value came from and
why it is wrong, and it never echoes a value back (a typo'd password must not reach a log).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    JsonConfigSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)
from pydantic_settings import SettingsError as SourceError

from deploy import SHIPPED_REGISTRY
from model.bundle import LATEST

ENV_PREFIX = "CALM_STREAM_"
ENV_NESTED_DELIMITER = "__"
CONFIG_FILE_ENV = f"{ENV_PREFIX}CONFIG"
# `calm-stream kafka start` reads the local broker's SASL password from here (never from argv).
LOCAL_KAFKA_PASSWORD_ENV = f"{ENV_PREFIX}LOCAL_KAFKA_SASL_PASSWORD"
# Variables with our prefix that are not settings: tools read them directly.
NON_SETTING_ENV = {CONFIG_FILE_ENV, LOCAL_KAFKA_PASSWORD_ENV}

_HOST_PORT = re.compile(r"^[A-Za-z0-9._-]+:\d{1,5}$|^\[[0-9A-Fa-f:]+\]:\d{1,5}$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _split_commas(value: Any) -> Any:
    """Accept `a:1,b:2` from env vars and flags as well as a real list from a config file."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


_TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"
# The pattern in the JSON Schema too (the chart's values.schema.json is made from it); the
# validator below gives the friendlier message.
_Topic = Annotated[str, WithJsonSchema({"type": "string", "pattern": _TOPIC_PATTERN})]


class KafkaTopics(_Section):
    iot: _Topic = "iot.readings"
    transactions: _Topic = "transactions"
    dlq: _Topic = "calm-stream.dlq"
    late: _Topic = "calm-stream.late"

    @field_validator("*")
    @classmethod
    def _legal_topic(cls, name: str) -> str:
        if not re.fullmatch(_TOPIC_PATTERN, name):
            raise ValueError(
                "a Kafka topic name is 1-249 characters of letters, digits, '.', '_' or '-'"
            )
        return name


class KafkaSettings(_Section):
    # Empty means "embedded default": the demo starts a local broker and fills this in.
    bootstrap_servers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    topics: KafkaTopics = Field(default_factory=KafkaTopics)
    group_id: str = Field("calm-stream", min_length=1)
    client_id: str = Field("calm-stream", min_length=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_password: SecretStr | None = None
    poll_max_records: int = Field(500, ge=1, le=100_000)
    poll_timeout_ms: int = Field(500, ge=1, le=60_000)
    # How long the broker may hold a fetch that has nothing new. kafka-python keeps one fetch in
    # flight per broker, so a fetch of caught-up partitions delays the partitions that have a
    # backlog by up to this much: its default (500) cost `bench pipeline` a quarter of its rate.
    fetch_max_wait_ms: int = Field(100, ge=0, le=60_000)
    max_message_bytes: int = Field(64 * 1024, ge=256, le=16 * 1024 * 1024)
    # How long a client may look for a broker that answers (and accepts its credentials) before
    # the program gives up: kafka-python's own default of 30 s per client hid the cause for 40 s.
    connect_timeout_seconds: float = Field(6, gt=0, le=600, allow_inf_nan=False)
    # How long a run waits for a broker that went away mid-run (restarted, rescheduled) before it
    # stops and says why; nothing is lost or repeated meanwhile: offsets are committed only once
    # the broker takes them.
    reconnect_timeout_seconds: float = Field(60, gt=0, le=3600, allow_inf_nan=False)

    _split_servers = field_validator("bootstrap_servers", mode="before")(_split_commas)

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port(cls, servers: list[str]) -> list[str]:
        for number, server in enumerate(servers, 1):
            if not _HOST_PORT.match(server) or not 0 < int(server.rsplit(":", 1)[1]) < 65536:
                # Not echoed: a mistyped value may hold credentials (user:password@host:port).
                raise ValueError(f"server {number} of {len(servers)} is not host:port")
        return servers

    @model_validator(mode="after")
    def _security_is_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_"):
            missing = [
                name
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"security_protocol {self.security_protocol} needs {', '.join(missing)}"
                )
        return self


class RaySettings(_Section):
    # None starts (or joins, inside a Ray job) a local Ray; "auto" or ray://host:port joins a cluster.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray")
    object_store_memory_mb: int = Field(
        512, ge=78, description="object store of a locally started Ray"
    )
    source_actors: int = Field(1, ge=1, le=256)
    inference_actors: int = Field(1, ge=1, le=256)
    source_actor_cpus: float = Field(0.5, gt=0)
    inference_actor_cpus: float = Field(1.0, gt=0)
    queue_max_batches: int = Field(
        8, ge=1, le=10_000, description="bound of each inter-actor queue"
    )
    # How long a run waits for a cluster to place its actors (an autoscaler adding nodes takes
    # minutes) before it stops and says what the cluster has.
    resource_timeout_seconds: float = Field(600, gt=0, le=86_400, allow_inf_nan=False)


class ModelSettings(_Section):
    registry: str = Field(
        "bundles", min_length=1, description="directory or URI holding model bundles"
    )
    bundle_version: str = Field("latest", min_length=1)
    task: Literal["summarize", "generate"] = "summarize"
    temperature: float = Field(0.5, gt=0, le=1)
    sampler: Literal["exact", "approximate", "adaptive"] = "adaptive"
    max_new_tokens: int = Field(128, ge=1, le=4096)
    batch_token_budget: int = Field(4096, ge=64)
    batch_latency_ms: int = Field(200, ge=1)
    intra_op_threads: int = Field(1, ge=1, le=256)

    def registry_or_shipped(self) -> str:
        """The configured registry; left at its default, the registry shipped with calm-stream
        (deploy/registry) until a bundle is published there."""
        default = type(self).model_fields["registry"].default
        if self.registry == default and not (Path(default) / LATEST).is_file():
            return str(SHIPPED_REGISTRY)
        return self.registry


class WindowSettings(_Section):
    kind: Literal["tumbling", "sliding"] = "tumbling"
    # Finite, and windows at least 1 ms: event time is in milliseconds.
    size_seconds: float = Field(300, ge=0.001, allow_inf_nan=False)
    slide_seconds: float | None = Field(None, ge=0.001, allow_inf_nan=False)
    watermark_delay_seconds: float = Field(30, ge=0, allow_inf_nan=False)
    allowed_lateness_seconds: float = Field(60, ge=0, allow_inf_nan=False)
    # What `future_timestamp` judges an event time against: the record's Kafka timestamp
    # (deterministic on replay), the broker's LogAppendTime (a producer's clock is not trusted;
    # the wall clock stands in on a topic that keeps CreateTime), or this consumer's wall clock.
    future_timestamp_clock: Literal["record", "log_append", "wall"] = "record"
    max_future_skew_seconds: float = Field(300, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _slide_matches_kind(self) -> WindowSettings:
        if self.kind == "sliding" and self.slide_seconds is None:
            raise ValueError("a sliding window needs slide_seconds")
        if self.kind == "sliding" and self.slide_seconds > self.size_seconds:
            raise ValueError("slide_seconds must not exceed size_seconds")
        if self.kind == "tumbling" and self.slide_seconds is not None:
            raise ValueError("slide_seconds applies only to kind=sliding")
        return self


class SinkSettings(_Section):
    root: str = Field(
        "calm-stream-data", min_length=1, description="local path or pyarrow filesystem URI"
    )
    rotate_rows: int = Field(10_000, ge=1)
    rotate_seconds: float = Field(60, gt=0)


class PricingSettings(_Section):
    node_type: str = "cpu-2"
    # On-demand list prices of small general-purpose nodes; override with your own contract.
    node_price_per_hour: dict[str, float] = Field(
        default_factory=lambda: {"cpu-2": 0.096, "cpu-8": 0.384, "gpu-h100": 4.0}
    )

    @model_validator(mode="after")
    def _priced(self) -> PricingSettings:
        if self.node_type not in self.node_price_per_hour:
            known = ", ".join(sorted(self.node_price_per_hour))
            raise ValueError(
                f"node_type {self.node_type!r} has no price in node_price_per_hour ({known})"
            )
        if any(price < 0 for price in self.node_price_per_hour.values()):
            raise ValueError("node prices must not be negative")
        return self


class MetricsSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535, description="Prometheus endpoint; 0 turns it off")


_config_file: ContextVar[Path | None] = ContextVar("calm_stream_config_file", default=None)


class Settings(BaseSettings):
    """Everything calm-stream can be told, in one typed tree."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        validate_default=True,
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    ray: RaySettings = Field(default_factory=RaySettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    windows: WindowSettings = Field(default_factory=WindowSettings)
    sinks: SinkSettings = Field(default_factory=SinkSettings)
    pricing: PricingSettings = Field(default_factory=PricingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(_file_source(settings_cls, config_file))
        return tuple(sources)


class SettingsError(ValueError):
    """Settings that cannot start the program; the message names each bad setting."""


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    readers = {
        ".yaml": lambda: YamlConfigSettingsSource(settings_cls, yaml_file=path),
        ".yml": lambda: YamlConfigSettingsSource(settings_cls, yaml_file=path),
        ".toml": lambda: TomlConfigSettingsSource(settings_cls, toml_file=path),
        ".json": lambda: JsonConfigSettingsSource(settings_cls, json_file=path),
    }
    if path.suffix.lower() not in readers:
        raise SettingsError(f"config file {path}: use .yaml, .yml, .toml or .json")
    if not path.is_file():
        raise SettingsError(f"config file {path}: no such file")
    try:
        return readers[path.suffix.lower()]()
    except (yaml.YAMLError, ValueError, TypeError) as error:
        raise SettingsError(f"config file {path}: {_file_problem(error)}") from None


def _file_problem(error: Exception) -> str:
    """Where a config file stops making sense, without quoting it (it may hold secrets)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        return f"line {error.problem_mark.line + 1}: {error.problem or error.context}"
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno}: {error.msg}"
    if isinstance(error, tomllib.TOMLDecodeError):
        return str(error)  # "... (at line L, column C)"
    # pydantic-settings updates a dict with the file's top level: a list or a scalar fails there.
    return "the file must hold a mapping of sections (kafka:, ray:, ...), not a list or a value"


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """Turn `section.field=value` flags into the nested dict pydantic expects."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        dotted, sep, value = assignment.partition("=")
        if not sep or not dotted.strip():
            raise SettingsError(f"--set {assignment!r}: expected section.field=value")
        node = overrides
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(f"--set {dotted}: conflicts with another --set")
        node[leaf] = value
    return overrides


def _unknown_env_vars() -> list[str]:
    """Names with our prefix that match no setting: almost always a typo that would be ignored."""
    known = {_env_name(path) for path in setting_paths()}
    sections = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    return sorted(
        name
        for name in os.environ
        if name.upper().startswith(ENV_PREFIX)
        and name.upper() not in NON_SETTING_ENV
        and name.upper() not in known
        and name.upper() not in sections
        and not _is_dict_entry(name.upper())
    )


def _is_dict_entry(name: str) -> bool:
    # CALM_STREAM_PRICING__NODE_PRICE_PER_HOUR__CPU_16 sets one key of a dict-valued setting.
    return any(name.startswith(_env_name(path) + ENV_NESTED_DELIMITER) for path in _dict_paths())


def _env_name(path: tuple[str, ...]) -> str:
    return f"{ENV_PREFIX}{ENV_NESTED_DELIMITER.join(path).upper()}"


def _dict_paths() -> Iterator[tuple[str, ...]]:
    """The dict-valued leaf settings, such as ('pricing', 'node_price_per_hour')."""
    for path in setting_paths():
        section: Any = Settings
        for part in path[:-1]:
            section = section.model_fields[part].annotation
        if get_origin(section.model_fields[path[-1]].annotation) is dict:
            yield path


def setting_paths(
    model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every leaf setting as a path such as ('kafka', 'topics', 'dlq')."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from setting_paths(annotation, prefix + (name,))
        else:
            yield prefix + (name,)


def load_settings(
    config_file: Path | str | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build the settings from defaults, file, environment and flags, or fail naming the setting."""
    unknown = _unknown_env_vars()
    if unknown:
        raise SettingsError(
            "unknown environment variable(s) "
            + ", ".join(unknown)
            + f": settings are {ENV_PREFIX}<SECTION>{ENV_NESTED_DELIMITER}<FIELD>, see `calm-stream settings`"
        )
    token = _config_file.set(_config_path(config_file))
    try:
        return Settings(**dict(overrides or {}))
    except ValidationError as error:
        raise SettingsError(_describe(error, value_sources(config_file, overrides))) from None
    except SourceError as error:  # an environment variable that is not the JSON it must be
        raise SettingsError(_describe_env_problem(error)) from None
    finally:
        _config_file.reset(token)


def _config_path(config_file: Path | str | None) -> Path | None:
    config_file = config_file or os.environ.get(CONFIG_FILE_ENV)
    return Path(config_file) if config_file else None


def _describe(error: ValidationError, sources: Mapping[tuple[str, ...], str]) -> str:
    # Only the location, its origin and pydantic's reason: never the input, which may be a secret.
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        loc = tuple(str(part) for part in item["loc"])
        origin = {
            "flag": f"from --set {'.'.join(loc)}",
            "env": f"from env {_env_name(loc)}",
            "default": "default",
        }.get(sources.get(loc, ""), f"from {sources.get(loc, 'several sources')}")
        reason = item["msg"].removeprefix("Value error, ")
        lines.append(f"{'.'.join(loc) or 'settings'} ({origin}): {reason}")
    return f"invalid setting{'s' if len(lines) > 1 else ''}: " + "; ".join(lines)


def _describe_env_problem(error: SourceError) -> str:
    # pydantic-settings names only the section ("kafka"); the variables under it are the suspects.
    match = re.search(r'field "(\w+)"', str(error))
    stem = _env_name((match.group(1),)) if match else ENV_PREFIX
    names = sorted(name for name in os.environ if name.upper().startswith(stem))
    return (
        f"environment variable {' or '.join(names) or stem}: a section or a dict-valued setting "
        f"takes a JSON object; set one field with {stem}{ENV_NESTED_DELIMITER}<FIELD>"
    )


def value_sources(
    config_file: Path | str | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[tuple[str, ...], str]:
    """Where each leaf setting's effective value came from: flag, env, file or default."""
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("flag", dict(overrides or {})),
        (
            "env",
            EnvSettingsSource(
                Settings, env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER
            )(),
        ),
    ]
    path = _config_path(config_file)
    if path is not None:
        layers.append((f"file {path}", _file_source(Settings, path)()))
    return {leaf: _first_layer(leaf, layers) for leaf in setting_paths()}


def _first_layer(path: tuple[str, ...], layers: list[tuple[str, Mapping[str, Any]]]) -> str:
    for name, values in layers:
        node: Any = values
        for part in path:
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            return name
    return "default"


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret replaced by '**********'."""
    return settings.model_dump(mode="json")  # SecretStr dumps as '**********' in json mode


def run_scoped_settings(settings: Settings, run_id: str) -> Settings:
    """Fresh topics, group and output directory for one self-contained run (`calm-stream demo`,
    `calm-stream bench pipeline`); the shipped bundle unless the configured registry holds one."""
    topics = settings.kafka.topics.model_copy(
        update={
            name: f"demo-{run_id}.{getattr(settings.kafka.topics, name)}"
            for name in ("iot", "transactions", "dlq", "late")
        }
    )
    kafka = settings.kafka.model_copy(
        update={"topics": topics, "group_id": f"calm-stream-demo-{run_id}"}
    )
    sinks = settings.sinks.model_copy(
        update={
            "root": str(Path(settings.sinks.root) / f"demo-{run_id}"),
            "rotate_seconds": min(settings.sinks.rotate_seconds, 2.0),
        }
    )
    model = settings.model
    if not (Path(model.registry) / LATEST).is_file():
        model = model.model_copy(update={"registry": str(SHIPPED_REGISTRY)})
    return settings.model_copy(update={"kafka": kafka, "sinks": sinks, "model": model})
