"""The `calm-stream` command line (pyproject's entry point): the root with the global settings
flags (`--config`, `--set`), `calm-stream settings`, and one sub-command or group per job, each
from its own module of pipeline/cli/."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.bench import bench_app
from pipeline.cli.domain import corpus_app, eval_app, produce_app
from pipeline.cli.errors import fail
from pipeline.cli.kafka import kafka_app
from pipeline.cli.model import export_command, generate_command
from pipeline.cli.run import demo_command, report_command, run_command
from pipeline.cli.train import train
from pipeline.settings import (
    Settings,
    SettingsError,
    load_settings,
    masked,
    parse_overrides,
    value_sources,
)

app = typer.Typer(
    name="calm-stream",
    help="Stream Kafka events through Continuous Autoregressive Language Models on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
app.add_typer(kafka_app, name="kafka")
app.add_typer(produce_app, name="produce")
app.add_typer(corpus_app, name="corpus")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")
app.command("demo")(demo_command)
app.command("run")(run_command)
app.command("report")(report_command)
app.command("train")(train)
app.command("export")(export_command)
app.command("generate")(generate_command)


@dataclass
class CliState:
    """What the root flags said; settings are loaded on first use so `--help` never needs them."""

    config_file: Path | None = None
    assignments: list[str] = field(default_factory=list)

    def overrides(self) -> dict[str, Any]:
        return parse_overrides(self.assignments)

    def settings(self) -> Settings:
        try:
            return load_settings(self.config_file, self.overrides())
        except SettingsError as error:
            raise fail(error) from None


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML, TOML or JSON settings file (also CALM_STREAM_CONFIG)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one setting: section.field=value (repeatable)."),
    ] = None,
) -> None:
    """Settings come from defaults < config file < CALM_STREAM_* env vars < --set flags."""
    ctx.obj = CliState(config, list(set_ or []))


def state(ctx: typer.Context) -> CliState:
    return ctx.find_root().obj


@app.command("settings")
def show_settings(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show the effective settings (secrets masked) and where each value came from."""
    cli = state(ctx)
    values = masked(cli.settings())
    sources = value_sources(cli.config_file, cli.overrides())
    rows = []
    for path, source in sources.items():
        value: Any = values
        for part in path:
            value = value[part]
        rows.append((".".join(path), value, source))
    if as_json:
        print(
            json.dumps(
                {name: {"value": value, "source": source} for name, value, source in rows}, indent=2
            )
        )
        return
    table = Table("setting", "value", "source", title="calm-stream settings")
    for name, value, source in rows:
        table.add_row(name, json.dumps(value), source)
    console.print(table)
