"""Settings: precedence of defaults < file < env < flags, and errors that name the setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.kafka.clients import kafka_client_options, kafka_consumer_options
from pipeline.settings import (
    SettingsError,
    load_settings,
    parse_overrides,
    setting_paths,
    value_sources,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CALM_STREAM_"):
            monkeypatch.delenv(name)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_valid() -> None:
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == []
    assert settings.ray.source_actors == 1
    assert settings.pricing.node_type in settings.pricing.node_price_per_hour


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_precedence_file_env_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    body = {
        ".yaml": "ray:\n  source_actors: 2\n  inference_actors: 2\nmodel:\n  max_new_tokens: 50\n",
        ".toml": "[ray]\nsource_actors = 2\ninference_actors = 2\n[model]\nmax_new_tokens = 50\n",
        ".json": json.dumps(
            {"ray": {"source_actors": 2, "inference_actors": 2}, "model": {"max_new_tokens": 50}}
        ),
    }[suffix]
    config = write(tmp_path / f"settings{suffix}", body)
    monkeypatch.setenv("CALM_STREAM_RAY__SOURCE_ACTORS", "3")
    monkeypatch.setenv("CALM_STREAM_RAY__INFERENCE_ACTORS", "3")
    overrides = parse_overrides(["ray.source_actors=4"])

    settings = load_settings(config, overrides)

    assert settings.ray.source_actors == 4  # flag beats env and file
    assert settings.ray.inference_actors == 3  # env beats file
    assert settings.model.max_new_tokens == 50  # file beats default
    assert settings.model.temperature == 0.5  # default
    sources = value_sources(config, overrides)
    assert sources[("ray", "source_actors")] == "flag"
    assert sources[("ray", "inference_actors")] == "env"
    assert sources[("model", "max_new_tokens")] == f"file {config}"
    assert sources[("model", "temperature")] == "default"


def test_config_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "c.yaml", "kafka:\n  group_id: from-file\n")
    monkeypatch.setenv("CALM_STREAM_CONFIG", str(config))
    assert load_settings().kafka.group_id == "from-file"


def test_comma_separated_servers_and_client_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALM_STREAM_KAFKA__BOOTSTRAP_SERVERS", "broker-1:9092, broker-2:9093")
    monkeypatch.setenv("CALM_STREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("CALM_STREAM_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("CALM_STREAM_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("CALM_STREAM_KAFKA__SASL_PASSWORD", "s3cret-value")
    options = kafka_client_options(load_settings().kafka)
    assert options["bootstrap_servers"] == ["broker-1:9092", "broker-2:9093"]
    assert options["sasl_plain_password"] == "s3cret-value"
    assert options["security_protocol"] == "SASL_SSL"


def test_fetch_wait_is_a_consumer_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """Consumers (sources, the benchmark's raw reader) get the fetch wait; producers and admin
    clients, which kafka-python would refuse it from, do not."""
    monkeypatch.setenv("CALM_STREAM_KAFKA__BOOTSTRAP_SERVERS", "broker-1:9092")
    monkeypatch.setenv("CALM_STREAM_KAFKA__FETCH_MAX_WAIT_MS", "250")
    kafka = load_settings().kafka
    assert kafka_consumer_options(kafka) == kafka_client_options(kafka) | {"fetch_max_wait_ms": 250}
    assert "fetch_max_wait_ms" not in kafka_client_options(kafka)


INVALID = [
    # (how it is set, name, value, the setting named in the error)
    ("env", "CALM_STREAM_RAY__SOURCE_ACTORS", "0", "ray.source_actors"),
    ("env", "CALM_STREAM_RAY__NUM_CPUS", "two", "ray.num_cpus"),
    ("env", "CALM_STREAM_KAFKA__BOOTSTRAP_SERVERS", "no-port-here", "kafka.bootstrap_servers"),
    ("env", "CALM_STREAM_KAFKA__SECURITY_PROTOCOL", "SASL_WHATEVER", "kafka.security_protocol"),
    ("env", "CALM_STREAM_KAFKA__SECURITY_PROTOCOL", "SASL_SSL", "sasl_mechanism"),
    ("env", "CALM_STREAM_KAFKA__TOPICS__DLQ", "bad topic!", "kafka.topics.dlq"),
    ("env", "CALM_STREAM_KAFKA__FETCH_MAX_WAIT_MS", "-1", "kafka.fetch_max_wait_ms"),
    ("env", "CALM_STREAM_MODEL__TEMPERATURE", "0", "model.temperature"),
    ("env", "CALM_STREAM_MODEL__TEMPERATURE", "1.5", "model.temperature"),
    ("env", "CALM_STREAM_MODEL__SAMPLER", "beam", "model.sampler"),
    ("env", "CALM_STREAM_WINDOWS__KIND", "sliding", "slide_seconds"),
    ("env", "CALM_STREAM_WINDOWS__SIZE_SECONDS", "-5", "windows.size_seconds"),
    ("env", "CALM_STREAM_SINKS__ROTATE_ROWS", "0", "sinks.rotate_rows"),
    ("env", "CALM_STREAM_PRICING__NODE_TYPE", "cpu-9000", "node_type"),
    ("env", "CALM_STREAM_METRICS__PORT", "70000", "metrics.port"),
    ("env", "CALM_STREAM_RAY__SOURCE_ACTOR", "2", "CALM_STREAM_RAY__SOURCE_ACTOR"),
    ("flag", "ray.inference_actors", "-1", "ray.inference_actors"),
    ("flag", "kafka.no_such_field", "1", "kafka.no_such_field"),
    ("flag", "ray.address=", "", "ray.address"),
    ("file", "windows.watermark_delay_seconds", "-1", "windows.watermark_delay_seconds"),
    ("file", "sinks.unknown", "1", "sinks.unknown"),
]


@pytest.mark.parametrize(("how", "name", "value", "named"), INVALID)
def test_invalid_values_name_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, name: str, value: str, named: str
) -> None:
    config, overrides = None, {}
    if how == "env":
        monkeypatch.setenv(name, value)
    elif how == "flag":
        overrides = parse_overrides([name if "=" in name else f"{name}={value}"])
        if name == "ray.address=":  # an empty address is allowed: it means "start a local Ray"
            assert load_settings(overrides=overrides).ray.address == ""
            return
    else:
        section, field = name.split(".")
        config = write(tmp_path / "bad.yaml", f"{section}:\n  {field}: {value}\n")
    with pytest.raises(SettingsError) as error:
        load_settings(config, overrides)
    assert named in str(error.value)


def test_errors_never_print_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALM_STREAM_KAFKA__SASL_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("CALM_STREAM_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv(
        "CALM_STREAM_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT"
    )  # mechanism missing
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert "hunter2" not in str(error.value)
    monkeypatch.setenv("CALM_STREAM_KAFKA__SASL_MECHANISM", "PLAIN")
    result = CliRunner().invoke(app, ["settings", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert "hunter2" not in result.output
    assert shown["kafka.sasl_password"] == {"value": "**********", "source": "env"}


def test_cli_reports_bad_setting_and_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(app, ["--set", "ray.source_actors=-3", "settings"])
    assert result.exit_code == 2
    assert "ray.source_actors" in result.output
    assert "--set ray.source_actors" in result.output


def test_settings_command_lists_every_setting(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", '[sinks]\nroot = "s3://bucket/prefix"\n')
    result = CliRunner().invoke(
        app, ["--config", str(config), "--set", "ray.num_cpus=2", "settings", "--json"]
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert set(shown) == {".".join(path) for path in setting_paths()}
    assert shown["sinks.root"] == {"value": "s3://bucket/prefix", "source": f"file {config}"}
    assert shown["ray.num_cpus"] == {"value": 2, "source": "flag"}


def test_malformed_set_flag_is_refused() -> None:
    with pytest.raises(SettingsError, match="section.field=value"):
        parse_overrides(["ray.num_cpus"])
