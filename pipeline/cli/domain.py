"""The event-domain commands: `produce iot|transactions`, `corpus build`, `eval summaries`.

pipeline/cli/app.py registers these Typer apps. Settings come from the root command's state
(`ctx.find_root().obj.settings()`), loaded only when a command needs Kafka.
"""

import itertools
import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from operators.facts import score
from pipeline.cli.errors import fail
from pipeline.kafka.check import check_kafka
from pipeline.kafka.clients import kafka_client_options
from pipeline.settings import SettingsError
from pipeline.sim.corpus import read_records, token_stats, write_corpus
from pipeline.sim.producer import FileWriter, TopicWriter, Writer, produce
from pipeline.sim.simulator import IOT_ANOMALIES, TXN_ANOMALIES, Mess, simulate

console = Console(stderr=True)
produce_app = typer.Typer(
    help="Send simulated events to Kafka (or to a file).", no_args_is_help=True
)
corpus_app = typer.Typer(
    help="Build the (prompt, reference summary) training corpus.", no_args_is_help=True
)
eval_app = typer.Typer(help="Evaluate generated outputs.", no_args_is_help=True)

Rate = Annotated[
    float, typer.Option("--rate", min=0, help="Messages per second; 0 = as fast as possible.")
]
Count = Annotated[int, typer.Option("--count", min=1, help="How many messages to send.")]
Seed = Annotated[int, typer.Option("--seed", help="Same seed, same stream.")]
Entities = Annotated[int, typer.Option("--entities", min=1, help="Devices or accounts.")]
AnomalyRate = Annotated[
    float,
    typer.Option(
        "--anomaly-rate", min=0, max=0.25, help="Share of entity-windows with each anomaly type."
    ),
]


def _share(what: str) -> object:
    return Annotated[float, typer.Option(min=0, max=1, help=f"Share of messages {what}.")]


Out = Annotated[
    Path | None, typer.Option("--out", help="Write JSON Lines to this file instead of Kafka.")
]
Topic = Annotated[str | None, typer.Option("--topic", help="Override the topic from the settings.")]


def _send(
    ctx: typer.Context,
    kind: Literal["iot", "transactions"],
    rate: float,
    count: int,
    seed: int,
    entities: int,
    anomaly_rate: float,
    mess: Mess,
    out: Path | None,
    topic: str | None,
) -> None:
    types = IOT_ANOMALIES if kind == "iot" else TXN_ANOMALIES
    sim = simulate(kind, seed, entities, {t: anomaly_rate for t in types}, mess)
    writer: Writer
    if out is not None:
        writer, target = FileWriter(out), str(out)
    else:
        kafka = ctx.find_root().obj.settings().kafka
        topic = topic or (kafka.topics.iot if kind == "iot" else kafka.topics.transactions)
        try:
            check_kafka(kafka)
            writer, target = TopicWriter(topic, kafka_client_options(kafka)), f"topic {topic}"
        except SettingsError as error:
            raise fail(error) from None
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{kind} -> {target}", total=count)
        report = produce(
            itertools.islice(sim.messages(), count),
            writer,
            rate or None,
            lambda n: progress.advance(task, n),
        )
    console.print(
        f"sent {report.count} messages in {report.seconds:.1f} s: {report.rate:,.0f} messages/s "
        f"({', '.join(f'{tag} {n}' for tag, n in sorted(report.tags.items()))})",
        highlight=False,
    )


@produce_app.command("iot")
def produce_iot(
    ctx: typer.Context,
    rate: Rate = 1000.0,
    count: Count = 10_000,
    seed: Seed = 0,
    entities: Entities = 50,
    anomaly_rate: AnomalyRate = 0.02,
    late: _share("arriving after their window closed") = 0.0,
    reordered: _share("arriving out of order") = 0.0,
    duplicate: _share("sent twice") = 0.0,
    malformed: _share("corrupted") = 0.0,
    out: Out = None,
    topic: Topic = None,
) -> None:
    """Simulated sensor readings: daily cycles with spikes, stuck sensors, dropouts and drifts."""
    mess = Mess(late=late, reordered=reordered, duplicate=duplicate, malformed=malformed)
    _send(ctx, "iot", rate, count, seed, entities, anomaly_rate, mess, out, topic)


@produce_app.command("transactions")
def produce_transactions(
    ctx: typer.Context,
    rate: Rate = 1000.0,
    count: Count = 10_000,
    seed: Seed = 0,
    entities: Entities = 200,
    anomaly_rate: AnomalyRate = 0.02,
    late: _share("arriving after their window closed") = 0.0,
    reordered: _share("arriving out of order") = 0.0,
    duplicate: _share("sent twice") = 0.0,
    malformed: _share("corrupted") = 0.0,
    out: Out = None,
    topic: Topic = None,
) -> None:
    """Simulated card payments: spending habits with bursts, card testing and impossible travel."""
    mess = Mess(late=late, reordered=reordered, duplicate=duplicate, malformed=malformed)
    _send(ctx, "transactions", rate, count, seed, entities, anomaly_rate, mess, out, topic)


@corpus_app.command("build")
def corpus_build(
    out: Annotated[Path, typer.Option("--out", help="Directory for train/valid/test files.")],
    seed: Seed = 0,
    windows: Annotated[
        int, typer.Option("--windows", min=10, help="Windows in all splits together.")
    ] = 20_000,
    fmt: Annotated[str, typer.Option("--format", help="parquet or jsonl.")] = "parquet",
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="BPE size for the token statistics; 0 skips them.")
    ] = 4096,
) -> None:
    """Simulate windows, write (prompt, reference) splits held out by entity, print statistics."""
    if fmt not in ("parquet", "jsonl"):
        raise typer.BadParameter("use parquet or jsonl", param_hint="--format")
    with console.status(f"building {windows} windows..."):
        manifest = write_corpus(out, seed, windows, fmt)  # type: ignore[arg-type]
        if vocab_size:
            manifest["tokens"] = token_stats(out, vocab_size)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


def evaluate_summaries(path: Path, column: str) -> dict:
    """Mean fact accuracy (and precision, recall, share of perfect outputs) over a file of outputs."""
    rows = read_records(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    missing = {"facts", column} - set(rows[0])
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)}; has {sorted(rows[0])}")
    scores = [score(row[column] or "", row["facts"]) for row in rows]
    n = len(scores)
    return {
        "file": str(path),
        "column": column,
        "rows": n,
        "fact_accuracy": round(sum(s.accuracy for s in scores) / n, 4),
        "fact_precision": round(sum(s.precision for s in scores) / n, 4),
        "fact_recall": round(sum(s.recall for s in scores) / n, 4),
        "exact": round(sum(s.accuracy == 1.0 for s in scores) / n, 4),
    }


@eval_app.command("summaries")
def eval_summaries(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="Parquet or JSONL with facts.")
    ],
    column: Annotated[
        str, typer.Option("--column", help="The column with the generated text.")
    ] = "output",
) -> None:
    """Fact accuracy of generated summaries against each row's `facts` (as the corpus stores them)."""
    try:
        print(json.dumps(evaluate_summaries(file, column), indent=2))
    except ValueError as error:
        raise fail(error) from None
