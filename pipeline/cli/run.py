"""`calm-stream run`, `calm-stream demo` and `calm-stream report`.

pipeline/cli/app.py registers them:

    app.command("run")(run_command)
    app.command("demo")(demo_command)
    app.command("report")(report_command)

Settings come from the root command's state (`ctx.find_root().obj.settings()`). The heavy
modules are imported inside the commands, so that `--help` and the other commands stay fast.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.errors import fail, reported
from pipeline.settings import SettingsError


def run_command(
    ctx: typer.Context,
    passthrough: Annotated[
        bool,
        typer.Option("--passthrough", help="Switch the model off: stream, windows and sinks only."),
    ] = False,
    until_idle: Annotated[
        float | None,
        typer.Option(
            "--until-idle",
            min=0.1,
            help="Bounded input: stop once every partition is read to its end "
            "and quiet for this many seconds, firing the open windows first.",
        ),
    ] = None,
) -> None:
    """Run the streaming pipeline from the settings until SIGTERM/SIGINT (drain, flush, commit)."""
    import ray

    from model.bundle import BundleError
    from pipeline.sinks.files import SinkError
    from pipeline.stream.job import JobOptions, preflight, run_pipeline
    from pipeline.stream.runtime import init_ray

    settings = ctx.find_root().obj.settings()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    stop, options = threading.Event(), JobOptions(passthrough=passthrough, until_idle_s=until_idle)
    try:
        preflight(settings, options)  # before Ray starts and logs: one line says what is wrong
        init_ray(settings.ray)  # ray.init installs a SIGTERM handler of its own: ours goes on top
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        report = run_pipeline(settings, options, stop)
    except (SettingsError, BundleError, SinkError) as error:
        ray.shutdown()  # Ray logs its killed actors as it stops: before the one line, not after
        raise fail(error) from None
    print(
        json.dumps(
            {
                "seconds": round(report.seconds, 2),
                "records": report.records,
                "tokens_out": report.tokens_out,
                "sink": report.sink,
                "paths": report.paths,
            }
        )
    )


def demo_command(
    ctx: typer.Context,
    iot_events: Annotated[
        int | None, typer.Option(min=1, help="Simulated IoT readings to send (default: 1600).")
    ] = None,
    transaction_events: Annotated[
        int | None, typer.Option(min=1, help="Simulated payments to send (default: 160).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
) -> None:
    """The embedded default: local broker (unless one is configured), local Ray, simulated IoT
    and payment streams, the shipped bundle; prints results, throughput, cost and file paths."""
    from dataclasses import replace

    from model.bundle import BundleError
    from pipeline.demo import DemoPlan, run_demo
    from pipeline.sinks.files import SinkError

    given = {"iot_events": iot_events, "transaction_events": transaction_events, "seed": seed}
    plan = replace(
        DemoPlan(), **{name: value for name, value in given.items() if value is not None}
    )
    with reported(SettingsError, BundleError, SinkError):
        run_demo(ctx.find_root().obj.settings(), plan)


def report_command(
    ctx: typer.Context,
    root: Annotated[
        str | None,
        typer.Argument(help="A sink root, e.g. a demo run's directory (default: sinks.root)."),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            help="Write the figures as a page of charts to this file instead (self-contained: "
            "opens offline in a browser) and print its path.",
        ),
    ] = None,
) -> None:
    """What a sink root holds, from its Parquet files: rows, tokens, steps, $ per 1k tokens next to
    the discrete baseline's, latency percentiles, fact accuracy, dead letters by reason. Prints
    JSON; with --html, writes the same figures over time as charts."""
    from pipeline.sinks.files import SinkError, local_root
    from pipeline.sinks.report import sink_report

    try:
        path = local_root(root or ctx.find_root().obj.settings().sinks.root)
    except SinkError as error:
        raise fail(error) from None
    if not path.is_dir():
        raise fail(f"no sink root at {path}")
    if html is None:
        print(json.dumps(sink_report(path), indent=2))
        return
    from pipeline.sinks.report_html import write_html_report

    try:
        print(write_html_report(path, html))
    except OSError as error:
        raise fail(f"--html: cannot write {html}: {error.strerror or error}") from None
