"""`calm-stream report ROOT --html FILE`: a run as one self-contained page of charts.

Built from the sink root's Parquet files alone, read by `pipeline.sinks.report` (the header's figures are
that module's JSON report, so the page and `report` never disagree). Charts are plotly figures;
plotly.js is inlined once, so the file opens offline from disk: no CDN, no server.

Everything over time is binned by wall-clock time: a telemetry row at its batch's start, a result
row when it was written (its window's newest Kafka timestamp plus its latency), a dead letter at
its Kafka timestamp (binned over the dead letters' own span: a root may hold nothing else). Bins
are UTC minutes for a run of 20 minutes or more; a shorter run gets the widest of 0.1, 0.2, 0.5, 1,
2, 5, 10, 15 or 30 seconds that still gives it 20 bins (a demo's inference takes seconds: per
minute it would be one dot). A rate divides a bin's total by the seconds of that bin the run
covered, so the first and last (partial) bins are not shown as slumps.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from plotly import graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from pipeline.sinks.report import SinkTables, read_sink, summarize

BIN_MILLIS = (100, 200, 500, 1000, 2000, 5000, 10_000, 15_000, 30_000, 60_000)
BINS_AT_LEAST = 20
LATEST_DEAD_LETTERS = 20
TEMPLATE = "plotly_white"
_TIME = pa.timestamp("ms", tz="UTC")
# Header figures: (label, path into the JSON report, format).
HEADER_FIGURES = (
    ("result rows", ("results", "rows"), "count"),
    ("tokens in", ("results", "tokens_in"), "count"),
    ("tokens generated", ("results", "tokens_out"), "count"),
    ("generative steps", ("telemetry", "steps"), "count"),
    ("tokens per step", ("telemetry", "tokens_per_step"), "ratio"),
    ("head draws per step", ("telemetry", "draws_per_step"), "ratio"),
    ("inference batches", ("telemetry", "batches"), "count"),
    ("cost", ("telemetry", "dollars"), "money"),
    ("$ per 1k tokens, CALM", ("telemetry", "dollars_per_1k_tokens"), "money"),
    ("$ per 1k tokens, discrete baseline", ("telemetry", "baseline_dollars_per_1k_tokens"), "money"),
    ("baseline FLOPs / CALM FLOPs", ("telemetry", "baseline_vs_calm_flops"), "ratio"),
    ("event→row latency p50", ("results", "latency_seconds", "p50"), "seconds"),
    ("event→row latency p99", ("results", "latency_seconds", "p99"), "seconds"),
    ("mean fact accuracy", ("results", "faithfulness", "fact_accuracy_mean"), "share"),
    ("summaries scored", ("results", "faithfulness", "rows_scored"), "count"),
    ("summaries with invented facts", ("results", "faithfulness", "rows_with_invented_facts"),
     "count"),
    ("dead letters", ("dead_letters", "rows"), "count"),
)  # fmt: skip


def write_html_report(root: Path, target: Path) -> Path:
    """The page for the sink root `root`, written to `target` (its folder is created)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(read_sink(root)), encoding="utf-8")
    return target


def render(sink: SinkTables) -> str:
    report = summarize(sink)
    if not (sink.results.num_rows or sink.telemetry.num_rows or sink.dlq.num_rows):
        body = _message(
            "This sink root holds no committed rows: no results, no telemetry and no dead "
            "letters yet."
        )
    else:
        body = _header(sink, report)
        if not (sink.results.num_rows or sink.telemetry.num_rows):
            body += _message(
                f"This sink root holds only dead letters ({sink.dlq.num_rows}): no result or "
                "telemetry rows to chart."
            )
        body += "".join(_section(section) for section in _sections(sink))
        body += _dead_letter_table(sink.dlq)
    return _PAGE.format(
        title=html.escape(f"calm-stream run: {sink.root}"),
        plotly=get_plotlyjs(),
        body=body,
    )


# --- sections


@dataclass(frozen=True)
class Section:
    name: str  # the chart's element is `chart-<name>`
    title: str
    caption: str
    figure: go.Figure | None  # None: nothing to draw


def _sections(sink: SinkTables) -> list[Section]:
    results, telemetry, dlq = sink.results, sink.telemetry, sink.dlq
    finished = _finished(results)
    clock = Clock.over([finished, telemetry["time"], _batch_ends(telemetry)])
    per = clock.label
    sections = []
    if results.num_rows or telemetry.num_rows:
        sections += [
            Section(
                "throughput",
                "Throughput",
                f"Per {per}. Events/s: the events of the windows whose result rows were written "
                "then. Generated tokens/s: the telemetry rows' tokens, by their batch's start.",
                _throughput(results, finished, telemetry, clock),
            ),
            Section(
                "cost",
                "$ per 1k generated tokens",
                f"Per {per}: CALM's node cost (idle time included) against the discrete "
                "baseline's counterfactual on the same outputs, and the share CALM saves.",
                _cost(telemetry, clock),
            ),
            Section(
                "steps",
                "Generative steps",
                f"Per {per}: steps/s; tokens and energy-head draws per step.",
                _steps(telemetry, clock),
            ),
            Section(
                "latency",
                "Event→row latency",
                f"From the window's newest Kafka timestamp to its result row, per {per} written.",
                _latency(results, finished, clock),
            ),
            Section(
                "batches",
                "Seconds per inference batch",
                "Queue (mean of the batch's requests), prefill and decode seconds of each batch.",
                _batch_seconds(telemetry),
            ),
            Section(
                "accuracy",
                "Fact accuracy",
                "Each summary against its own window's facts: the distribution over windows, and "
                "the share of summaries that state a fact their window does not have, by kind.",
                _accuracy(results),
            ),
        ]
    sections.append(
        Section(
            "dead-letters",
            "Dead letters by reason",
            "Messages routed to the DLQ or the late topic, by their Kafka timestamp.",
            _dead_letters(dlq),
        )
    )
    return sections


def _throughput(
    results: pa.Table, finished: pa.Array, telemetry: pa.Table, clock: Clock
) -> go.Figure | None:
    figure = go.Figure()
    if results.num_rows:
        bins, (events,) = clock.sums(finished, [results["events"]], every_bin=True)
        figure.add_trace(_line(bins, clock.rates(bins, events), "events/s"))
    if telemetry.num_rows:
        bins, (tokens,) = clock.sums(telemetry["time"], [telemetry["tokens_out"]], every_bin=True)
        trace = _line(bins, clock.rates(bins, tokens), "generated tokens/s")
        figure.add_trace(trace.update(yaxis="y2"))
    figure.update_layout(
        yaxis_title="events/s", yaxis2={"title": "tokens/s", "overlaying": "y", "side": "right"}
    )
    return _figure(figure)


def _cost(telemetry: pa.Table, clock: Clock) -> go.Figure | None:
    if not telemetry.num_rows:
        return None
    bins, (tokens, dollars, baseline) = clock.sums(
        telemetry["time"],
        [telemetry[name] for name in ("tokens_out", "dollars", "baseline_dollars")],
        every_bin=True,  # a bin without batches is a gap in the lines, not a bridge
    )
    figure = make_subplots(specs=[[{"secondary_y": True}]])
    figure.add_trace(_line(bins, _divide(1000 * dollars, tokens), "CALM"))
    figure.add_trace(_line(bins, _divide(1000 * baseline, tokens), "discrete baseline"))
    saving = go.Bar(x=bins, y=1 - _divide(dollars, baseline), name="saving", opacity=0.3)
    figure.add_trace(saving, secondary_y=True)
    figure.update_yaxes(title_text="$ per 1k tokens", exponentformat="e", secondary_y=False)
    figure.update_yaxes(title_text="saving", tickformat=".0%", secondary_y=True)
    return _figure(figure)


def _steps(telemetry: pa.Table, clock: Clock) -> go.Figure | None:
    if not telemetry.num_rows:
        return None
    bins, (steps, tokens, draws) = clock.sums(
        telemetry["time"],
        [telemetry[name] for name in ("steps", "tokens_out", "draws")],
        every_bin=True,
    )
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    figure.add_trace(_line(bins, clock.rates(bins, steps), "steps/s"), row=1, col=1)
    figure.add_trace(_line(bins, _divide(tokens, steps), "tokens per step"), row=2, col=1)
    figure.add_trace(_line(bins, _divide(draws, steps), "head draws per step"), row=2, col=1)
    figure.update_yaxes(title_text="steps/s", row=1, col=1)
    figure.update_yaxes(title_text="per step", row=2, col=1)
    return _figure(figure, height=520)


def _latency(results: pa.Table, finished: pa.Array, clock: Clock) -> go.Figure | None:
    if not results.num_rows:
        return None
    by_bin: dict[datetime, list[float]] = defaultdict(list)
    written = clock.floor(finished).to_pylist()
    for when, latency in zip(written, results["latency_seconds"].to_pylist()):
        by_bin[when].append(latency)
    bins = sorted(by_bin)
    figure = go.Figure()
    for q in (50, 90, 99):
        values = np.asarray([np.percentile(by_bin[b], q) for b in bins])
        figure.add_trace(_line(bins, values, f"p{q}"))
    figure.update_layout(yaxis_title="seconds")
    return _figure(figure)


def _batch_seconds(telemetry: pa.Table) -> go.Figure | None:
    if not telemetry.num_rows:
        return None
    ordered = telemetry.sort_by("time")
    figure = go.Figure()
    for name in ("queue_seconds", "prefill_seconds", "decode_seconds"):
        figure.add_trace(
            go.Bar(x=ordered["time"].to_pylist(), y=ordered[name].to_pylist(), name=name[:-8])
        )
    figure.update_layout(barmode="stack", yaxis_title="seconds", xaxis_title="batch start")
    return _figure(figure)


def _accuracy(results: pa.Table) -> go.Figure | None:
    scored = results.filter(pc.is_valid(results["fact_accuracy"]))
    if not scored.num_rows:
        return None
    kinds = sorted(set(scored["kind"].to_pylist()))
    figure = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.65, 0.35],
        subplot_titles=("fact accuracy over windows", "summaries with invented facts"),
    )
    invented = []
    for kind in kinds:
        rows = scored.filter(pc.equal(scored["kind"], kind))
        accuracy = rows["fact_accuracy"].to_pylist()
        bins = {"start": 0, "end": 1.0001, "size": 0.1}
        figure.add_trace(go.Histogram(x=accuracy, name=kind, xbins=bins, opacity=0.7), 1, 1)
        invented.append(pc.mean(pc.cast(pc.greater(rows["invented_facts"], 0), pa.float64())))
    shares = [share.as_py() for share in invented]
    figure.add_trace(go.Bar(x=kinds, y=shares, name="invented facts", showlegend=False), 1, 2)
    figure.update_layout(barmode="overlay")
    figure.update_xaxes(title_text="fact accuracy", range=[0, 1], row=1, col=1)
    figure.update_yaxes(title_text="windows", row=1, col=1)
    figure.update_yaxes(tickformat=".0%", range=[0, 1], row=1, col=2)
    return _figure(figure)


def _dead_letters(dlq: pa.Table) -> go.Figure | None:
    if not dlq.num_rows:
        return None
    clock = Clock.over([dlq["timestamp"]])  # a root may hold dead letters alone
    figure = go.Figure()
    for reason in sorted(set(dlq["reason"].to_pylist())):
        rows = dlq.filter(pc.equal(dlq["reason"], reason))
        bins, (count,) = clock.sums(rows["timestamp"], [pa.array(np.ones(rows.num_rows))])
        figure.add_trace(go.Bar(x=bins, y=count, name=reason))
    figure.update_layout(barmode="stack", yaxis_title=f"dead letters per {clock.label}")
    return _figure(figure)


# --- time and arithmetic


def _finished(results: pa.Table) -> pa.Array:
    """When each result row was written: its window's newest Kafka timestamp plus its latency."""
    return _later(results["last_ingested"], results["latency_seconds"])


def _batch_ends(telemetry: pa.Table) -> pa.Array:
    return _later(telemetry["time"], telemetry["busy_seconds"])


def _later(times: pa.ChunkedArray, seconds: pa.ChunkedArray) -> pa.Array:
    millis = pc.cast(pc.round(pc.multiply(seconds, 1000)), pa.int64())
    later = pc.add(pc.cast(times, pa.int64()), millis)
    return pc.cast(later, _TIME).combine_chunks()


def _span(times: Iterable[pa.Array | pa.ChunkedArray]) -> tuple[datetime, datetime]:
    present = [t for t in times if len(t)]
    if not present:
        now = datetime.now(UTC)
        return now, now
    return min(pc.min(t).as_py() for t in present), max(pc.max(t).as_py() for t in present)


@dataclass(frozen=True)
class Clock:
    """The run's time span and the width of the bins its charts sum over."""

    start: datetime
    end: datetime
    millis: int  # a bin's width

    @classmethod
    def over(cls, times: Iterable[pa.Array | pa.ChunkedArray]) -> Clock:
        start, end = _span(times)
        span = (end - start) / timedelta(milliseconds=1)
        fits = [ms for ms in BIN_MILLIS if span / ms >= BINS_AT_LEAST]
        return cls(start, end, fits[-1] if fits else BIN_MILLIS[0])

    @property
    def label(self) -> str:
        return "minute" if self.millis == 60_000 else f"{self.millis / 1000:g} s"

    def floor(self, times: pa.Array | pa.ChunkedArray) -> pa.Array:
        return pc.floor_temporal(times, multiple=self.millis, unit="millisecond")

    def sums(
        self,
        times: pa.Array | pa.ChunkedArray,
        values: Sequence[pa.Array | pa.ChunkedArray],
        every_bin: bool = False,
    ) -> tuple[list[datetime], list[np.ndarray]]:
        """Each value column summed per bin of `times`, the bins in order: those that hold a
        time, or (`every_bin`) every bin of the span, 0 where none does (so that a line of rates
        drops to 0 across a pause instead of bridging it)."""
        columns = {f"v{i}": pc.cast(v, pa.float64()) for i, v in enumerate(values)}
        table = pa.table({"bin": self.floor(times), **columns})
        grouped = table.group_by("bin").aggregate([(name, "sum") for name in columns])
        bins = grouped["bin"].to_pylist()
        sums = [grouped[f"{name}_sum"].to_numpy() for name in columns]
        if every_bin:
            width = timedelta(milliseconds=self.millis)
            first = self.floor(pa.array([self.start], _TIME))[0].as_py()
            everything = [first + i * width for i in range(int((self.end - first) / width) + 1)]
            place = {when: i for i, when in enumerate(everything)}
            at = [place[when] for when in bins]
            sums = [np.bincount(at, weights=column, minlength=len(place)) for column in sums]
            return everything, sums
        order = np.argsort(bins)
        return [bins[i] for i in order], [column[order] for column in sums]

    def rates(self, bins: list[datetime], totals: np.ndarray) -> np.ndarray:
        """Per-second rates of per-bin totals, over the seconds of each bin the run covered (at
        least half a bin: an edge bin the run barely touches would spike)."""
        width = timedelta(milliseconds=self.millis)
        covered = [(min(b + width, self.end) - max(b, self.start)).total_seconds() for b in bins]
        return totals / np.maximum(np.asarray(covered), width.total_seconds() / 2)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise; NaN (a gap in the line) where the denominator is zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator != 0, numerator / denominator, np.nan)


# --- HTML


def _line(x: Sequence[datetime], y: np.ndarray, name: str) -> go.Scatter:
    # Markers too: a line of one bin is a dot.
    return go.Scatter(x=list(x), y=y.tolist(), name=name, mode="lines+markers")


def _figure(figure: go.Figure, height: int = 420) -> go.Figure | None:
    if not figure.data:
        return None
    return figure.update_layout(
        template=TEMPLATE, height=height, margin={"t": 40, "b": 40}, legend={"orientation": "h"}
    )


def _section(section: Section) -> str:
    if section.figure is None:
        chart = '<p class="none">No rows for this chart.</p>'
    else:
        chart = section.figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"chart-{section.name}",
            config={"displaylogo": False, "responsive": True},
        )
    return (
        f'<section id="{section.name}"><h2>{html.escape(section.title)}</h2>'
        f"<p>{html.escape(section.caption)}</p>{chart}</section>"
    )


def _message(text: str) -> str:
    return f'<p class="message">{html.escape(text)}</p>'


def _header(sink: SinkTables, report: dict[str, Any]) -> str:
    figures = "".join(
        f"<tr><th>{html.escape(label)}</th>"
        f'<td data-key="{".".join(path)}" data-value="{html.escape(json.dumps(_at(report, path)))}"'
        f">{html.escape(_format(_at(report, path), kind))}</td></tr>"
        for label, path, kind in HEADER_FIGURES
    )
    facts = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
        for label, value in _run_facts(sink, report)
    )
    return (
        f'<header><table class="facts">{facts}</table>'
        f'<table class="figures">{figures}</table></header>'
    )


def _run_facts(sink: SinkTables, report: dict[str, Any]) -> list[tuple[str, str]]:
    """Model, time range and the settings that shaped the run, as the rows themselves record."""
    results, telemetry = sink.results, sink.telemetry
    times = [_finished(results), telemetry["time"], sink.dlq["timestamp"]]
    start, end = _span(times)
    facts = [
        ("sink root", str(sink.root)),
        ("model", ", ".join(sorted(report["results"]["by_model"])) or "n/a"),
        ("time range (UTC)", f"{start:%Y-%m-%d %H:%M:%S} – {end:%Y-%m-%d %H:%M:%S}"),
    ]
    if results.num_rows:
        sizes = pc.unique(pc.subtract(results["window_end"], results["window_start"])).to_pylist()
        facts.append(("window size", ", ".join(f"{s.total_seconds():g} s" for s in sorted(sizes))))
        facts.append(("rows by kind", _counts(report["results"]["by_kind"])))
    if telemetry.num_rows:
        node_columns = ("node_type", "node_price_per_hour", "node_share")
        nodes = sorted(set(zip(*(telemetry[c].to_pylist() for c in node_columns))))
        facts += [
            ("K (tokens per step at most)", _distinct(telemetry["k"])),
            ("inference actors", str(len(pc.unique(telemetry["actor"])))),
            ("largest batch", str(pc.max(telemetry["batch_size"]).as_py())),
            ("node", "; ".join(f"{t} at ${p:g}/h, share {s:g}" for t, p, s in nodes)),
        ]
    if sink.dlq.num_rows:
        facts.append(("dead letters by reason", _counts(report["dead_letters"]["by_reason"])))
    return facts


def _dead_letter_table(dlq: pa.Table) -> str:
    if not dlq.num_rows:
        return ""
    columns = ("timestamp", "reason", "topic", "partition", "offset", "field", "message")
    latest = dlq.sort_by([("timestamp", "descending"), ("offset", "descending")])
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row[c]))}</td>" for c in columns) + "</tr>"
        for row in latest.slice(0, LATEST_DEAD_LETTERS).select(columns).to_pylist()
    )
    head = "".join(f"<th>{c}</th>" for c in columns)
    return (
        f'<section id="latest-dead-letters"><h2>Latest dead letters</h2>'
        f'<table class="letters"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
        "</section>"
    )


def _at(report: dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = report
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _format(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    return {
        "count": lambda v: f"{v:,.0f}",
        "ratio": lambda v: f"{v:.4g}",
        "money": lambda v: f"${v:.4g}",
        "seconds": lambda v: f"{v:.4g} s",
        "share": lambda v: f"{100 * v:.4g} %",
    }[kind](value)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in sorted(counts.items()))


def _distinct(column: pa.ChunkedArray) -> str:
    return ", ".join(str(v) for v in sorted(pc.unique(column).to_pylist()))


def _cell(value: Any) -> str:
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S}"
    return "" if value is None else str(value)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1100px;
        color: #222; }}
header {{ display: flex; gap: 2rem; flex-wrap: wrap; }}
table {{ border-collapse: collapse; font-size: 0.9rem; }}
th, td {{ text-align: left; padding: 0.2rem 0.6rem; border-bottom: 1px solid #ddd; }}
table.figures td {{ text-align: right; font-variant-numeric: tabular-nums; }}
.message {{ font-size: 1.2rem; padding: 1rem; background: #fff4d6; }}
.none {{ color: #777; }}
section {{ margin-top: 2rem; }}
</style>
<script>{plotly}</script>
</head>
<body>
<h1>{title}</h1>
{body}
</body>
</html>
"""
