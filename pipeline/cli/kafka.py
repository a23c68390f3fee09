"""`calm-stream kafka fetch|start|stop|status`: a local Apache Kafka broker that outlives the CLI.

The broker itself is pipeline.kafka.local_broker's: single-node KRaft from Maven Central jars, on free
loopback ports, recorded in a state file under the user cache dir so later commands find it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.errors import fail
from pipeline.kafka import local_broker
from pipeline.kafka.local_broker import BrokerState, KafkaBrokerError, SaslUser
from pipeline.settings import LOCAL_KAFKA_PASSWORD_ENV

kafka_app = typer.Typer(
    help="Run a local Apache Kafka broker (single-node KRaft, from Maven Central jars).",
    no_args_is_help=True,
)
console = Console()

NameOption = Annotated[
    str, typer.Option("--name", "-n", help="Which local broker (several can run side by side).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


def _describe(state: BrokerState) -> str:
    text = f"{state.bootstrap_servers} (PLAINTEXT)"
    if state.sasl_bootstrap_servers:
        text += f", {state.sasl_bootstrap_servers} (SASL_PLAINTEXT, user {state.sasl_username})"
    return text


@kafka_app.command("fetch")
def fetch() -> None:
    """Fetch the broker jars from Maven Central into the user cache (once; later runs reuse them)."""
    try:
        with console.status(f"fetching the Kafka {local_broker.kafka_version()} broker jars..."):
            libs = local_broker.fetch_jars()
    except KafkaBrokerError as error:
        raise fail(error, 1) from None
    console.print(
        f"Kafka {local_broker.kafka_version()} broker jars: {libs}", highlight=False, soft_wrap=True
    )


def _sasl_password(ctx: typer.Context, password: str | None, file: Path | None) -> str | None:
    """The password from the environment or a private file: a command line is visible to every
    user of the machine (`ps`), so --sasl-password given there is refused."""
    source = ctx.get_parameter_source("sasl_password")  # typer's own click: compare by name
    if source is not None and source.name == "COMMANDLINE":
        raise fail(
            f"--sasl-password on the command line is visible to every user: set "
            f"{LOCAL_KAFKA_PASSWORD_ENV} or use --sasl-password-file"
        )
    if file is None:
        return password
    if file.stat().st_mode & 0o077:
        raise fail(f"--sasl-password-file {file}: readable by others; chmod 600 it")
    return file.read_text().strip()


@kafka_app.command("start")
def start(
    ctx: typer.Context,
    name: NameOption = "default",
    sasl_user: Annotated[
        str | None,
        typer.Option(
            help="Also open a SASL_PLAINTEXT listener (PLAIN and SCRAM-SHA-256) for this user."
        ),
    ] = None,
    sasl_password: Annotated[
        str | None,
        typer.Option(
            help=f"Password of --sasl-user, from {LOCAL_KAFKA_PASSWORD_ENV} only "
            "(refused on the command line, where every user can read it).",
            envvar=LOCAL_KAFKA_PASSWORD_ENV,
            show_envvar=True,
        ),
    ] = None,
    sasl_password_file: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="Or read the password from this file (mode 0600)."
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait until it serves.")] = 120.0,
    as_json: JsonOption = False,
) -> None:
    """Start a fresh local broker in the background and print its bootstrap servers.

    The first start fetches the broker jars with Maven (once, into the user cache dir).
    """
    sasl_password = _sasl_password(ctx, sasl_password, sasl_password_file)
    if (sasl_user is None) != (sasl_password is None):
        raise fail("--sasl-user and --sasl-password go together")
    try:
        sasl = SaslUser(sasl_user, sasl_password) if sasl_user is not None else None
        with console.status(f"starting Kafka {local_broker.kafka_version()} broker {name!r}..."):
            state = local_broker.start(name, sasl=sasl, startup_timeout_s=timeout)
    except ValueError as error:
        raise fail(error) from None
    except KafkaBrokerError as error:
        raise fail(error, 1) from None
    if as_json:
        print(json.dumps(asdict(state), indent=2))
        return
    console.print(
        f"Kafka {state.kafka_version} broker {name!r} serves at {_describe(state)}, "
        f"pid {state.pid}",
        highlight=False,
    )
    console.print(
        f"export CALM_STREAM_KAFKA__BOOTSTRAP_SERVERS={state.bootstrap_servers}",
        highlight=False,
        soft_wrap=True,
    )


@kafka_app.command("status")
def status(name: NameOption = "default", as_json: JsonOption = False) -> None:
    """Show whether the local broker runs and serves; exit code 1 when it does not."""
    try:
        current = local_broker.status(name)
    except (ValueError, KafkaBrokerError) as error:
        raise fail(error) from None
    if current is None:
        if as_json:
            print(json.dumps({"name": name, "running": False}))
        else:
            console.print(f"no local broker {name!r} was started", highlight=False)
        raise typer.Exit(1)
    state = current.state
    if as_json:
        print(
            json.dumps(
                {
                    **asdict(state),
                    "running": current.running,
                    "process_alive": current.process_alive,
                    "port_open": current.port_open,
                },
                indent=2,
            )
        )
    else:
        table = Table(title=f"local Kafka broker {name!r}", show_header=False)
        table.add_column("field")
        table.add_column("value", overflow="fold")
        verdict = "[green]serving[/]" if current.running else "[red]not serving[/]"
        rows = [
            ("status", verdict),
            ("bootstrap servers", _describe(state)),
            ("pid", f"{state.pid} ({'alive' if current.process_alive else 'gone'})"),
            ("port", "accepting" if current.port_open else "closed"),
            ("kafka version", state.kafka_version),
            ("up since", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started_at))),
            ("work dir", state.workdir),
            ("log", state.log_path),
        ]
        for key, value in rows:
            table.add_row(key, value)
        console.print(table)
    if not current.running:
        raise typer.Exit(1)


@kafka_app.command("stop")
def stop(
    name: NameOption = "default",
    timeout: Annotated[
        float, typer.Option(help="Seconds of clean shutdown before SIGKILL.")
    ] = 30.0,
) -> None:
    """Stop the local broker and delete its data (the next start is a fresh cluster)."""
    try:
        state = local_broker.stop(name, timeout_s=timeout)
    except (ValueError, KafkaBrokerError) as error:
        raise fail(error) from None
    if state is None:
        console.print(f"no local broker {name!r} was running", highlight=False)
    else:
        console.print(f"stopped local broker {name!r} (pid {state.pid})", highlight=False)
