"""`calm-stream train`: the staged training job on Ray (tokenizer -> autoencoder -> CALM / AR).
`run_on_ray` is shared with `calm-stream bench reproduce` (pipeline/cli/bench.py), which trains
with the same job.

Only the config layer is imported here: the job itself (torch, Ray Train) is imported when a
command runs, so that `calm-stream --help` and the serving image (no torch) never load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.errors import console, fail
from pipeline.training.stages import (
    DEFAULT_CONFIG,
    STAGES,
    TrainConfigError,
    load_train_config,
    plan_stages,
)
from pipeline.training.storage import json_safe

DEFAULT_STORAGE = "calm-stream-data/train"


Workers = Annotated[int, typer.Option("--workers", min=1, help="Data-parallel Ray Train workers.")]
CpusPerWorker = Annotated[
    float, typer.Option("--cpus-per-worker", min=0.1, help="CPUs per worker (torch threads).")
]


def run_on_ray(ctx: typer.Context, job, request, corpus: str) -> None:
    """Check the corpus, start or join Ray (the root flags choose), run `job(request, console)`
    and print its JSON. A bad corpus exits with 2 before Ray starts; a failed job with 1."""
    from pipeline.stream.runtime import init_ray
    from pipeline.training.corpus import CorpusError, inspect_corpus
    from pipeline.training.job import TrainJobError

    try:
        inspect_corpus(corpus)
    except CorpusError as error:
        raise fail(error) from None
    init_ray(ctx.find_root().obj.settings().ray)
    try:
        result = job(request, console)
    except (TrainJobError, CorpusError) as error:
        raise fail(error, 1) from None
    print(json.dumps(json_safe(result), indent=2, sort_keys=True))


def train(
    ctx: typer.Context,
    corpus: Annotated[
        str,
        typer.Option(
            "--corpus", help="Corpus directory from `corpus build`, or a .jsonl/.parquet of {text}."
        ),
    ],
    stage: Annotated[
        list[str] | None,
        typer.Option(
            "--stage", help=f"Stage(s) to run, with what they need: {', '.join(STAGES)}, all."
        ),
    ] = None,
    config: Annotated[
        Path, typer.Option("--config", help="Stage config (YAML).", exists=True, dir_okay=False)
    ] = DEFAULT_CONFIG,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config field: stage.section.field=value."),
    ] = None,
    storage: Annotated[
        str,
        typer.Option(
            "--storage",
            help="Where runs live: a path or a pyarrow filesystem URI (s3://, gs://...).",
        ),
    ] = DEFAULT_STORAGE,
    run_name: Annotated[
        str | None, typer.Option("--run-name", help="Run directory (default: the config's name).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an existing run: finished stages are kept, a stopped one resumes.",
        ),
    ] = False,
    workers: Workers = 2,
    cpus_per_worker: CpusPerWorker = 1.0,
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="One GPU per worker, NCCL.")] = False,
    max_failures: Annotated[
        int,
        typer.Option(
            "--max-failures", min=0, help="Worker-group restarts from the last checkpoint."
        ),
    ] = 0,
) -> None:
    """Train tokenizer -> autoencoder -> CALM and/or the AR baseline with Ray Train; prints JSON."""
    from pipeline.training.job import TrainRequest, run_training

    try:
        train_config = load_train_config(config, set_)
        stages = tuple(plan_stages(stage or ["all"]))
    except TrainConfigError as error:
        raise fail(error) from None
    request = TrainRequest(
        config=train_config,
        corpus=corpus,
        storage=storage,
        run_name=run_name or config.stem,
        stages=stages,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        use_gpu=use_gpu,
        resume=resume,
        max_failures=max_failures,
    )
    run_on_ray(ctx, run_training, request, corpus)
