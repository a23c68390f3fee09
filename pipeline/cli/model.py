"""Model commands: `export` (torch checkpoint -> versioned bundle) and `generate` (a bundle in
onnxruntime). The bundle options (`RegistryOpt`, `VersionOpt`, `Threads`) are shared with
`bench generate` (pipeline/cli/bench.py).

pipeline/cli/app.py registers them; `generate` never imports torch.
"""

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from model.bundle import BundleError, Registry
from pipeline.cli.errors import console, fail

Threads = Annotated[
    int | None, typer.Option("--threads", min=1, help="Intra-op threads (default: settings).")
]
RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        help="Registry directory or URI (default: settings model.registry; left at its "
        "default, the registry shipped with calm-stream until a bundle is published there).",
    ),
]
VersionOpt = Annotated[
    str | None, typer.Option("--version", help="Bundle version or 'latest' (default: settings).")
]


def export_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            exists=True,
            file_okay=False,
            help="A training run directory (run.json, tokenizer/, calm/, ar/), or a CALM "
            "checkpoint directory (config.json + model.safetensors) with --tokenizer.",
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="Registry (directory or URI) to publish into.")],
    name: Annotated[str, typer.Option("--name", help="Bundle name.")] = "calm-events",
    version: Annotated[
        str | None, typer.Option("--version", help="Bundle version (default: UTC time stamp).")
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option("--tokenizer", exists=True, help="tokenizer.json (checkpoint dir)."),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", exists=True, help="AR baseline checkpoint (checkpoint dir)."),
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8/--no-int8", help="Add dynamically quantised int8 graphs.")
    ] = False,
    weights: Annotated[
        Literal["float32", "float16"],
        typer.Option(
            "--weights", help="float16 stores the weights at half size (math in float32)."
        ),
    ] = "float32",
    baseline_graphs: Annotated[
        bool,
        typer.Option(
            "--baseline-graphs/--no-baseline-graphs",
            help="Export the AR baseline's graph (its config and metrics are kept anyway).",
        ),
    ] = True,
    latest: Annotated[
        bool, typer.Option("--latest/--no-latest", help="Point the registry's `latest` at it.")
    ] = True,
    eval_file: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            exists=True,
            dir_okay=False,
            help="Held-out corpus split (prompt, facts): fact accuracy of the exported "
            "graphs in onnxruntime goes into the manifest's metrics.",
        ),
    ] = None,
    eval_windows: Annotated[int, typer.Option("--eval-windows", min=1)] = 64,
) -> None:
    """Export CALM (and its AR baseline) to ONNX and publish a verified bundle."""
    import tempfile

    from model.bundle import update_manifest
    from model.checkpoint import load_checkpoint
    from model.export import export_bundle
    from pipeline.bench.generate import summary_quality
    from pipeline.sim.corpus import read_records
    from pipeline.training.storage import FinishedRun, read_finished_run

    version = version or datetime.now(UTC).strftime("%Y%m%d.%H%M%S")
    try:
        if (checkpoint / "run.json").is_file():
            trained = read_finished_run(checkpoint)  # the run's layout is storage.py's business
        else:
            if tokenizer is None:
                raise ValueError("a checkpoint directory needs --tokenizer")
            trained = FinishedRun(
                calm_checkpoint=checkpoint,
                ar_checkpoint=baseline,
                tokenizer_path=tokenizer,
                metrics={},
                recipe={"checkpoint": str(checkpoint.resolve())},
            )
        calm = load_checkpoint(trained.calm_checkpoint)
        ar = load_checkpoint(trained.ar_checkpoint) if trained.ar_checkpoint else None
        registry = Registry(out)
        with tempfile.TemporaryDirectory() as tmp, console.status("exporting ONNX graphs"):
            bundle = export_bundle(
                calm,
                trained.tokenizer_path,
                tmp,
                name,
                version,
                ar=ar,
                metrics=trained.metrics,
                recipe=trained.recipe | {"export": " ".join(["calm-stream", *sys.argv[1:]])},
                int8=int8,
                ar_graphs=baseline_graphs,
                weights=weights,
            )
            if eval_file is not None:
                records = read_records(eval_file)[:eval_windows]
                quality = summary_quality(bundle.path, records)
                metrics = bundle.manifest["metrics"] | {
                    "onnxruntime": {"eval_file": eval_file.name, **quality}
                }
                bundle = update_manifest(bundle, {"metrics": metrics})
            published = registry.publish(bundle, make_latest=latest)
    except (BundleError, ValueError, FileNotFoundError, TypeError) as error:
        raise fail(error) from None
    size = sum(f["bytes"] for f in bundle.manifest["files"].values())
    console.print(f"published {published} ({size / 1e6:.1f} MB) to {out}", highlight=False)
    print(json.dumps({"bundle": published, "registry": out, "bytes": size}))


def _prompts(prompt: str | None, file: Path | None) -> list[str]:
    if (prompt is None) == (file is None):
        raise ValueError("give a PROMPT or --file, not both")
    if prompt is not None:
        return [prompt]
    if file.suffix == ".jsonl":
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        if not all(isinstance(r, dict) and "prompt" in r for r in rows):
            raise ValueError(f"{file}: every line must be a JSON object with a 'prompt'")
        return [r["prompt"] for r in rows]
    return [file.read_text()]


def generate_command(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Argument(help="Prompt text.")] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            exists=True,
            dir_okay=False,
            help="A text file (one prompt) or JSONL with a 'prompt' per line.",
        ),
    ] = None,
    registry: RegistryOpt = None,
    version: VersionOpt = None,
    model: Annotated[
        Literal["calm", "ar"], typer.Option("--model", help="CALM or its discrete baseline.")
    ] = "calm",
    temperature: Annotated[
        float | None, typer.Option("--temperature", min=0, max=1, help="Default: settings.")
    ] = None,
    sampler: Annotated[
        Literal["exact", "approximate", "adaptive"] | None,
        typer.Option("--sampler", help="CALM temperature sampler (default: settings)."),
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1)] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the first prompt (+1 per prompt).")
    ] = 0,
    threads: Threads = None,
    int8: Annotated[bool, typer.Option("--int8", help="Use the bundle's int8 graphs.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per prompt.")] = False,
) -> None:
    """Generate with a bundle in onnxruntime; prints the text and per-request stats."""
    from model.engine import Engine, Request, Sampling

    settings = ctx.find_root().obj.settings().model
    try:
        prompts = _prompts(prompt, file)
        bundle = Registry(registry or settings.registry_or_shipped()).open(
            version or settings.bundle_version
        )
        engine = Engine(bundle, model, threads=threads or settings.intra_op_threads, int8=int8)
        sampling = Sampling(
            temperature=settings.temperature if temperature is None else temperature,
            sampler=sampler or settings.sampler,
        )
        limit = max_new_tokens or settings.max_new_tokens
        requests = [Request(engine.prompt_ids(p), seed + i, limit) for i, p in enumerate(prompts)]
        results = engine.generate(requests, sampling)
    except (BundleError, ValueError) as error:
        raise fail(error) from None
    if as_json:
        for r in results:
            print(
                json.dumps(
                    {
                        "bundle": bundle.id,
                        "model": model,
                        "text": r.text,
                        "finish_reason": r.finish_reason,
                        **vars(r.stats),
                    }
                )
            )
        return
    table = Table(
        "#",
        "in",
        "out",
        "steps",
        "head samples",
        "prefill s",
        "decode s",
        "finish",
        title=f"{bundle.id} {model} T={sampling.temperature} {sampling.sampler}",
    )
    for i, r in enumerate(results):
        print(r.text)
        s = r.stats
        table.add_row(
            str(i),
            str(s.tokens_in),
            str(s.tokens_out),
            str(s.steps),
            str(s.head_samples),
            f"{s.prefill_s:.3f}",
            f"{s.decode_s:.3f}",
            r.finish_reason,
        )
    console.print(table)
