"""`calm-stream report`: what a sink root holds, computed from its Parquet files alone.

The same figures a dashboard reads: result rows by kind and model, tokens and generative steps,
head draws per step, $ per 1k tokens next to the discrete baseline's counterfactual, the FLOPs
ratio, latency percentiles, the summaries' fact accuracy against their windows and dead letters
by reason. Only committed files count (a reader never sees a file the sink has not renamed into
place).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.sinks.files import read_dataset
from pipeline.sinks.schemas import DEAD_LETTER_SCHEMA, RESULT_SCHEMA, TELEMETRY_SCHEMA


def _total(table: pa.Table, column: str) -> float:
    return (pc.sum(table.column(column)).as_py() or 0.0) if table.num_rows else 0.0


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4)}


def _faithfulness(results: pa.Table) -> dict[str, Any]:
    """Summaries against their windows' facts: mean fact accuracy, and how many rows state a
    fact their window does not have (rows without a summary are not scored)."""
    scored = results.filter(pc.is_valid(results["fact_accuracy"]))
    return {
        "rows_scored": scored.num_rows,
        "fact_accuracy_mean": pc.mean(scored["fact_accuracy"]).as_py(),
        "rows_with_invented_facts": pc.sum(pc.greater(scored["invented_facts"], 0)).as_py() or 0,
    }


@dataclass(frozen=True)
class SinkTables:
    """The committed rows of a sink root's three datasets (empty tables where none are)."""

    root: Path
    results: pa.Table
    telemetry: pa.Table
    dlq: pa.Table


def read_sink(root: Path) -> SinkTables:
    return SinkTables(
        root,
        read_dataset(root / "results", schema=RESULT_SCHEMA),
        read_dataset(root / "telemetry", schema=TELEMETRY_SCHEMA),
        read_dataset(root / "dlq", schema=DEAD_LETTER_SCHEMA),
    )


def sink_report(root: Path) -> dict[str, Any]:
    """Summary of the `results/`, `telemetry/` and `dlq/` datasets under `root`."""
    return summarize(read_sink(root))


def summarize(sink: SinkTables) -> dict[str, Any]:
    root, results, telemetry, dlq = sink.root, sink.results, sink.telemetry, sink.dlq
    tokens = int(_total(telemetry, "tokens_out"))
    steps = int(_total(telemetry, "steps"))
    dollars, baseline = _total(telemetry, "dollars"), _total(telemetry, "baseline_dollars")
    flops, baseline_flops = _total(telemetry, "flops"), _total(telemetry, "baseline_flops")
    models = Counter(
        f"{name}@{version}"
        for name, version in zip(
            results.column("model_name").to_pylist(), results.column("model_version").to_pylist()
        )
    )
    return {
        "root": str(root),
        "results": {
            "rows": results.num_rows,
            "by_kind": dict(Counter(results.column("kind").to_pylist())),
            "by_model": dict(models),
            "tokens_in": int(_total(results, "tokens_in")),
            "tokens_out": int(_total(results, "tokens_out")),
            "latency_seconds": _percentiles(results.column("latency_seconds").to_pylist()),
            "faithfulness": _faithfulness(results),
        },
        "telemetry": {
            "batches": telemetry.num_rows,
            "tokens_out": tokens,
            "steps": steps,
            "tokens_per_step": _ratio(tokens, steps),
            "draws_per_step": _ratio(_total(telemetry, "draws"), steps),
            "busy_seconds": _total(telemetry, "busy_seconds"),
            "idle_seconds": _total(telemetry, "idle_seconds"),
            "dollars": dollars,
            "dollars_per_1k_tokens": _ratio(1000 * dollars, tokens),
            "baseline_dollars": baseline,
            "baseline_dollars_per_1k_tokens": _ratio(1000 * baseline, tokens),
            "flops": flops,
            "baseline_flops": baseline_flops,
            "baseline_vs_calm_flops": _ratio(baseline_flops, flops),
        },
        "dead_letters": {
            "rows": dlq.num_rows,
            "by_reason": dict(Counter(dlq.column("reason").to_pylist())),
        },
        "paths": {name: str(root / name) for name in ("results", "telemetry", "dlq")},
    }
