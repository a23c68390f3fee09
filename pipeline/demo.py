"""`calm-stream demo`: the whole pipeline on a laptop, from simulated events to Parquet.

With no Kafka configured a throwaway local broker is started (pipeline.kafka.embedded); simulated IoT
readings and card payments, with a few malformed, late, reordered and duplicated messages, are
sent to fresh topics; the pipeline runs on a local Ray with the shipped model bundle until the
input is consumed; then a short table shows results, throughput, cost and where the files are, and
a page of charts (`report.html`, as `calm-stream report --html` writes it) goes beside the data.
Each demo run writes under its own directory (and consumer group), so runs never mix.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.kafka.clients import kafka_client_options
from pipeline.kafka.embedded import kafka_or_local
from pipeline.settings import Settings, run_scoped_settings
from pipeline.sim.producer import TopicWriter, produce
from pipeline.sim.simulator import Mess, simulate
from pipeline.sinks.files import read_dataset
from pipeline.sinks.report import sink_report
from pipeline.sinks.report_html import write_html_report
from pipeline.sinks.schemas import RESULT_SCHEMA
from pipeline.stream.job import JobOptions, JobReport, ensure_topics, run_pipeline

DEMO_MESS = Mess(late=0.01, reordered=0.05, duplicate=0.01, malformed=0.01)


@dataclass(frozen=True)
class DemoPlan:
    """About 110 windows: a few minutes of the shipped model's generation on 2 cores."""

    iot_events: int = 1600
    transaction_events: int = 160
    devices: int = 8
    accounts: int = 16
    seed: int = 0


def send_simulated(settings: Settings, plan: DemoPlan) -> dict[str, Counter]:
    """Simulated IoT and transaction streams into their topics; the delivery tags sent."""
    client = kafka_client_options(settings.kafka)
    topics = settings.kafka.topics
    ensure_topics(settings, [topics.iot, topics.transactions], partitions=2)
    sent = {}
    for kind, topic, count, entities in (
        ("iot", topics.iot, plan.iot_events, plan.devices),
        ("transactions", topics.transactions, plan.transaction_events, plan.accounts),
    ):
        stream = simulate(kind, seed=plan.seed, entities=entities, mess=DEMO_MESS)
        sent[kind] = produce(
            itertools.islice(stream.messages(), count), TopicWriter(topic, client)
        ).tags
    return sent


def run_demo(
    settings: Settings, plan: DemoPlan = DemoPlan(), console: Console | None = None
) -> JobReport:
    console = console or Console()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    with kafka_or_local(settings) as embedded:
        settings = run_scoped_settings(embedded, run_id)
        console.print(
            f"kafka {', '.join(settings.kafka.bootstrap_servers)}; bundle registry "
            f"{settings.model.registry}; sending simulated events ...",
            highlight=False,
        )
        sent = send_simulated(settings, plan)
        console.print(
            "sent "
            + "; ".join(
                f"{kind}: {sum(tags.values())} ({_tags(tags)})" for kind, tags in sent.items()
            ),
            highlight=False,
        )
        console.print("running the pipeline on a local Ray until the input is consumed ...")
        report = run_pipeline(settings, JobOptions(until_idle_s=2.0))
    show(report, console)
    root = Path(report.paths["results"]).parent
    page = write_html_report(root, root / "report.html")
    console.print(f"charts of this run (open in a browser): {page}", highlight=False)
    return report


def _tags(tags: Counter) -> str:
    return ", ".join(f"{tag} {n}" for tag, n in sorted(tags.items()))


def show(report: JobReport, console: Console) -> None:
    """Results, throughput, cost and where the files are."""
    results = read_dataset(Path(report.paths["results"]), schema=RESULT_SCHEMA)
    table = Table(
        "kind", "entity", "window (UTC)", "events", "facts", "output", title="results (sample)"
    )
    ordered = results.sort_by([("window_start", "ascending"), ("key", "ascending")]).to_pylist()
    for kind in ("iot", "transaction"):
        for row in [r for r in ordered if r["kind"] == kind][:4]:
            window = f"{row['window_start']:%m-%d %H:%M}-{row['window_end']:%H:%M}"
            facts = _share(row["fact_accuracy"])
            table.add_row(
                kind, row["entity"], window, str(row["events"]), facts, _short(row["output"])
            )
    console.print(table)
    summary = Table("", "", title="run")
    for name, value in summary_rows(report, sink_report(Path(report.paths["results"]).parent)):
        summary.add_row(name, value)
    console.print(summary)


def summary_rows(report: JobReport, sink: dict[str, Any]) -> list[tuple[str, str]]:
    seconds, tokens = report.processing_seconds, report.tokens_out
    cost, dead, faithful = sink["telemetry"], sink["dead_letters"], sink["results"]["faithfulness"]
    ratio = cost["baseline_vs_calm_flops"]
    return [
        ("events consumed", f"{report.records:,}"),
        (
            "dead letters",
            f"{dead['rows']} ({_tags(Counter(dead['by_reason']))})" if dead["rows"] else "0",
        ),
        ("result rows", f"{sink['results']['rows']:,} (one per closed window)"),
        ("model", ", ".join(sorted(sink["results"]["by_model"]))),
        (
            "fact accuracy",
            (
                f"{_share(faithful['fact_accuracy_mean'])} of the windows' facts stated correctly; "
                f"{faithful['rows_with_invented_facts']} of {faithful['rows_scored']} summaries "
                "state a fact their window does not have"
            ),
        ),
        (
            "throughput",
            (
                f"{report.records / seconds:,.0f} events/s, "
                f"{tokens / seconds:,.0f} generated tokens/s over {seconds:.1f} s"
            ),
        ),
        (
            "cost per 1k tokens",
            (
                f"{_money(cost['dollars_per_1k_tokens'])} CALM vs "
                f"{_money(cost['baseline_dollars_per_1k_tokens'])} for the discrete baseline, "
                + (f"which needs {ratio:.2f}x CALM's FLOPs " if ratio else "")
                + "(node price, idle time included)"
            ),
        ),
        ("results", report.paths["results"]),
        ("telemetry", report.paths["telemetry"]),
        ("dead letters", report.paths["dlq"]),
    ]


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _money(amount: float | None) -> str:
    return "n/a" if amount is None else f"${amount:.3g}"


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
