"""`calm-stream bench ...`: one command per benchmark, each printing one JSON document (benchmarks
are commands, never timed tests). Each command parses its options, calls the benchmark's one
function in pipeline/bench/ and prints.

The heavy modules are imported inside the commands, so that `--help` stays fast and torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from model.bundle import BundleError, Registry
from pipeline.cli.errors import console, fail, reported
from pipeline.cli.model import RegistryOpt, Threads, VersionOpt
from pipeline.cli.train import CpusPerWorker, Workers, run_on_ray
from pipeline.kafka.clients import kafka_client_options
from pipeline.settings import SettingsError
from pipeline.training.recipe_arms import ARMS
from pipeline.training.stages import TrainConfigError
from pipeline.training.storage import json_safe

bench_app = typer.Typer(help="Benchmarks; each prints one JSON document.", no_args_is_help=True)


@bench_app.command("produce")
def produce_command(
    ctx: typer.Context,
    count: Annotated[int, typer.Option(min=1, help="Events per pass.")] = 100_000,
    kind: Annotated[Literal["iot", "transactions"], typer.Option(help="Which stream.")] = "iot",
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
) -> None:
    """Simulator -> Kafka rate against kafka-python's raw produce rate for the same payloads.

    Uses kafka.bootstrap_servers, or a throwaway local broker when none is configured."""
    from pipeline.bench.produce import print_bench_produce
    from pipeline.kafka.embedded import kafka_or_local

    with reported(SettingsError), kafka_or_local(ctx.find_root().obj.settings()) as settings:
        print_bench_produce(kafka_client_options(settings.kafka), count=count, kind=kind, seed=seed)


@bench_app.command("sampling")
def sampling_command() -> None:
    """Vectorised samplers vs a per-row loop, and the adaptive sampler's draws and bias."""
    from pipeline.bench.sampling import main as bench_sampling_main

    bench_sampling_main()


@bench_app.command("generate")
def generate_command(
    ctx: typer.Context,
    registry: RegistryOpt = None,
    version: VersionOpt = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint",
            exists=True,
            file_okay=False,
            help="Training run for the torch eager side (default: random weights of the "
            "bundle's dimensions, enough for T = 1 speed).",
        ),
    ] = None,
    prompts: Annotated[int, typer.Option("--prompts", min=1, help="Simulated prompts.")] = 32,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    repeats: Annotated[
        int,
        typer.Option(
            "--repeats", min=1, help="Rounds of every backend (best and median reported)."
        ),
    ] = 3,
    threads: Threads = None,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the JSON here.")] = None,
) -> None:
    """CALM K=4 vs the same-backbone AR baseline, onnxruntime vs torch eager; prints JSON."""
    from pipeline.bench.generate import run_benchmark

    settings = ctx.find_root().obj.settings().model
    try:
        bundle = Registry(registry or settings.registry_or_shipped()).open(
            version or settings.bundle_version
        )
        report = run_benchmark(
            bundle.path,
            checkpoint=checkpoint,
            n_prompts=prompts,
            max_new_tokens=max_new_tokens,
            repeats=repeats,
            threads=threads or settings.intra_op_threads,
            temperature=settings.temperature,
            sampler=settings.sampler,
            summary_tokens=settings.max_new_tokens,
        )
    except (BundleError, ValueError) as error:
        raise fail(error) from None
    text = json.dumps(report, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    print(text)


@bench_app.command("pipeline")
def pipeline_command(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(min=100, help="Simulated events in the backlog.")] = 20_000,
    model_events: Annotated[
        int, typer.Option(min=100, help="Events of the backlog the model phases read.")
    ] = 2_000,
    live_seconds: Annotated[
        float, typer.Option(min=5, help="Length of the paced latency run.")
    ] = 30.0,
    seed: Annotated[int, typer.Option(help="Simulator seed.")] = 0,
) -> None:
    """End-to-end events/s and tokens/s beside kafka-python's raw consume rate and the
    standalone engine's tokens/s on the same prompts; latency, memory and CPU time per actor. JSON."""
    from pipeline.bench.pipeline import bench_pipeline
    from pipeline.kafka.embedded import kafka_or_local

    with reported(SettingsError), kafka_or_local(ctx.find_root().obj.settings()) as settings:
        print(
            json.dumps(
                bench_pipeline(
                    settings,
                    events=events,
                    model_events=model_events,
                    live_seconds=live_seconds,
                    seed=seed,
                ),
                indent=2,
            )
        )


@bench_app.command("reproduce")
def reproduce_command(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option("--out", help="Directory for table.json, table.md, plot.png and the runs."),
    ],
    budget_minutes: Annotated[
        float,
        typer.Option("--budget-minutes", min=1, help="Training wall time for all models together."),
    ] = 20.0,
    corpus: Annotated[
        str | None,
        typer.Option(
            "--corpus", help="Documents file (default: the shipped WikiText-103 test documents)."
        ),
    ] = None,
    workers: Workers = 2,
    cpus_per_worker: CpusPerWorker = 1.0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Keep models already trained in --out.")
    ] = False,
) -> None:
    """The paper's table in miniature: AE, CALM K=1/2/4 and AR at two sizes under one CPU budget."""
    from pipeline.bench.reproduce import ReproduceRequest, run_reproduction

    request = ReproduceRequest(
        out=out,
        budget_minutes=budget_minutes,
        corpus=corpus,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        resume=resume,
    )
    run_on_ray(ctx, run_reproduction, request, request.corpus_path)


@bench_app.command("recipe")
def recipe_command(
    run: Annotated[
        Path,
        typer.Option(
            "--run", help="A training run whose tokenizer and autoencoder every arm shares."
        ),
    ],
    corpus: Annotated[str, typer.Option("--corpus", help="Domain corpus from `corpus build`.")],
    out: Annotated[
        Path, typer.Option("--out", help="Directory for <arm>.json, table.json/.md, curves.png.")
    ],
    arms: Annotated[
        list[str] | None,
        typer.Option("--arm", help=f"Arm to train (repeatable; default all): {', '.join(ARMS)}."),
    ] = None,
    budget_minutes: Annotated[
        float,
        typer.Option("--budget-minutes", min=0.1, help="Training CPU minutes per arm."),
    ] = 10.0,
    budget_steps: Annotated[
        int | None,
        typer.Option(
            "--budget-steps",
            min=1,
            help="Optimiser steps per arm instead of CPU minutes (for --device cuda).",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="torch device the arms train on: cpu, cuda, cuda:1...")
    ] = "cpu",
    evaluations: Annotated[
        int, typer.Option("--evaluations", min=1, help="Evaluation points per arm.")
    ] = 6,
    parallel: Annotated[
        int, typer.Option("--parallel", min=1, help="Arms trained at once (a process each).")
    ] = 2,
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Model and training settings (default: the domain recipe)."),
    ] = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field: stage.section.field=value."),
    ] = None,
) -> None:
    """The recipe study: CALM (and AR) recipes side by side under one budget, with
    learning curves of summary loss and teacher-forced digit-chunk accuracy, then BrierLM, fact
    accuracy and head draws per step on the test split."""
    from pipeline.bench.recipe import Budget, load_assets, run_study

    try:
        assets = load_assets(run, corpus, str(config) if config else None, assignments or [])
    except (FileNotFoundError, ValueError, TrainConfigError) as error:
        raise fail(error) from None

    def progress(name: str, result: dict) -> None:
        console.print(f"{name}: {result['steps']} steps, final {result['curve'][-1]}")

    names = arms or list(ARMS)
    budget = Budget(steps=budget_steps) if budget_steps else Budget(cpu_seconds=budget_minutes * 60)
    table = run_study(assets, names, out, budget, evaluations, parallel, progress, device)
    print(json.dumps(json_safe(table), indent=2, sort_keys=True))
