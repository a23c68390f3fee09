"""`calm-stream bench ...`: benchmarks are commands that print JSON, never timed tests."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from model.bench_sampling import main as bench_sampling_main
from pipeline.bench_produce import print_bench_produce
from pipeline.cli_errors import reported
from pipeline.cli_model import bench_generate_command
from pipeline.cli_run import bench_pipeline_command
from pipeline.cli_train import recipe, reproduce
from pipeline.embedded import kafka_or_local
from pipeline.settings import SettingsError, kafka_client_options

bench_app = typer.Typer(help="Benchmarks; each prints one JSON document.", no_args_is_help=True)


@bench_app.command("produce")
def bench_produce(
    ctx: typer.Context,
    count: Annotated[int, typer.Option(min=1, help="Events per pass.")] = 100_000,
    kind: Annotated[Literal["iot", "transactions"], typer.Option(help="Which stream.")] = "iot",
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
) -> None:
    """Simulator -> Kafka rate against kafka-python's raw produce rate for the same payloads.

    Uses kafka.bootstrap_servers, or a throwaway local broker when none is configured."""
    with reported(SettingsError), kafka_or_local(ctx.find_root().obj.settings()) as settings:
        print_bench_produce(kafka_client_options(settings.kafka), count=count, kind=kind, seed=seed)


@bench_app.command("sampling")
def bench_sampling() -> None:
    """Vectorised samplers vs a per-row loop, and the adaptive sampler's draws and bias."""
    bench_sampling_main()


bench_app.command("generate")(bench_generate_command)
bench_app.command("pipeline")(bench_pipeline_command)
bench_app.command("reproduce")(reproduce)
bench_app.command("recipe")(recipe)
