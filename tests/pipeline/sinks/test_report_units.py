"""`calm-stream report`'s `summarize` over small hand-built `SinkTables` (pyarrow tables with the
sink's schemas, no files): row counts, totals, ratios (None where the denominator is zero),
latency percentiles and the faithfulness figures, each expected value worked out by hand from
the rows the test builds."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.sinks.report import SinkTables, summarize
from pipeline.sinks.schemas import DEAD_LETTER_SCHEMA, RESULT_SCHEMA, TELEMETRY_SCHEMA

# pyarrow imports pandas on its first conversion from Python objects (seconds on a loaded
# box): paid here, at import, rather than inside whichever test converts first.
pa.array([0])
ROOT = Path("/sink")


def table(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    """Rows with only the columns a test cares about; the others null."""
    return pa.Table.from_pylist([dict.fromkeys(schema.names) | r for r in rows], schema=schema)


def sink(results=(), telemetry=(), dlq=()) -> SinkTables:
    return SinkTables(
        ROOT,
        table(RESULT_SCHEMA, list(results)),
        table(TELEMETRY_SCHEMA, list(telemetry)),
        table(DEAD_LETTER_SCHEMA, list(dlq)),
    )


def result(kind="iot", model=("tiny", "1"), latency=1.0, accuracy=None, invented=None, **more):
    return {
        "kind": kind,
        "model_name": model[0],
        "model_version": model[1],
        "latency_seconds": latency,
        "fact_accuracy": accuracy,
        "invented_facts": invented,
        **more,
    }


def batch(tokens_out, steps, draws=0, dollars=0.0, baseline=0.0, flops=0.0, baseline_flops=0.0):
    return {
        "tokens_out": tokens_out,
        "steps": steps,
        "draws": draws,
        "dollars": dollars,
        "baseline_dollars": baseline,
        "flops": flops,
        "baseline_flops": baseline_flops,
        "busy_seconds": 2.0,
        "idle_seconds": 0.5,
    }


def test_an_empty_sink() -> None:
    report = summarize(sink())
    assert report["results"] == {
        "rows": 0,
        "by_kind": {},
        "by_model": {},
        "tokens_in": 0,
        "tokens_out": 0,
        "latency_seconds": {},
        "faithfulness": {
            "rows_scored": 0,
            "fact_accuracy_mean": None,
            "rows_with_invented_facts": 0,
        },
    }
    ratios = ("tokens_per_step", "draws_per_step", "dollars_per_1k_tokens")
    assert [report["telemetry"][r] for r in ratios] == [None, None, None]
    assert report["telemetry"]["baseline_vs_calm_flops"] is None
    assert report["telemetry"]["batches"] == 0 and report["telemetry"]["dollars"] == 0
    assert report["dead_letters"] == {"rows": 0, "by_reason": {}}


def test_results_by_kind_and_model_with_token_totals() -> None:
    report = summarize(
        sink(
            results=[
                result("iot", ("tiny", "1"), tokens_in=100, tokens_out=20),
                result("transaction", ("tiny", "2"), tokens_in=50, tokens_out=5),
                result("iot", ("tiny", "2"), tokens_in=7, tokens_out=None),
            ]
        )
    )["results"]
    assert report["rows"] == 3
    assert report["by_kind"] == {"iot": 2, "transaction": 1}
    assert report["by_model"] == {"tiny@1": 1, "tiny@2": 2}
    assert (report["tokens_in"], report["tokens_out"]) == (157, 25)


def test_telemetry_totals_and_ratios() -> None:
    batches = [
        batch(30, 10, draws=35, dollars=0.002, baseline=0.02, flops=1e9, baseline_flops=8e9),
        batch(70, 15, draws=65, dollars=0.003, baseline=0.03, flops=3e9, baseline_flops=12e9),
    ]
    t = summarize(sink(telemetry=batches))["telemetry"]
    assert (t["batches"], t["tokens_out"], t["steps"]) == (2, 100, 25)
    assert t["tokens_per_step"] == pytest.approx(4.0)  # 100 / 25
    assert t["draws_per_step"] == pytest.approx(4.0)  # (35 + 65) / 25
    assert (t["busy_seconds"], t["idle_seconds"]) == (4.0, 1.0)
    assert t["dollars"] == pytest.approx(0.005)
    assert t["dollars_per_1k_tokens"] == pytest.approx(0.05)  # 1000 * 0.005 / 100
    assert t["baseline_dollars"] == pytest.approx(0.05)
    assert t["baseline_dollars_per_1k_tokens"] == pytest.approx(0.5)  # 1000 * 0.05 / 100
    assert (t["flops"], t["baseline_flops"]) == (pytest.approx(4e9), pytest.approx(2e10))
    assert t["baseline_vs_calm_flops"] == pytest.approx(5.0)  # 2e10 / 4e9


def test_a_zero_denominator_gives_none() -> None:
    """Passthrough batches: no tokens, no steps, no FLOPs."""
    t = summarize(sink(telemetry=[batch(0, 0, baseline_flops=1e9), batch(0, 0)]))["telemetry"]
    assert t["batches"] == 2
    for ratio in (
        "tokens_per_step",
        "draws_per_step",
        "dollars_per_1k_tokens",
        "baseline_dollars_per_1k_tokens",
        "baseline_vs_calm_flops",
    ):
        assert t[ratio] is None, ratio


@pytest.mark.parametrize(
    ("latencies", "p50", "p99"),
    [
        ([2.0], 2.0, 2.0),
        ([4.0, 1.0, 3.0, 2.0, 5.0], 3.0, 4.96),  # p99 at rank 0.99 * 4 = 3.96: 4 + 0.96 * (5 - 4)
        ([float(i) for i in range(101)], 50.0, 99.0),
        ([0.1, 0.2], 0.15, 0.199),  # midway; 0.1 + 0.99 * 0.1
    ],
)
def test_latency_percentiles(latencies, p50, p99) -> None:
    report = summarize(sink(results=[result(latency=s) for s in latencies]))
    assert report["results"]["latency_seconds"] == {
        "p50": pytest.approx(p50),
        "p99": pytest.approx(p99),
    }


def test_faithfulness_over_the_scored_rows_only() -> None:
    rows = [
        result(accuracy=1.0, invented=0),
        result(accuracy=0.5, invented=2),
        result(accuracy=0.25, invented=1),
        result(accuracy=None, invented=None),  # not a summary: not scored
    ]
    faith = summarize(sink(results=rows))["results"]["faithfulness"]
    assert faith["rows_scored"] == 3
    assert faith["fact_accuracy_mean"] == pytest.approx(1.75 / 3)
    assert faith["rows_with_invented_facts"] == 2


def test_dead_letters_by_reason_and_the_paths() -> None:
    letters = [{"reason": r} for r in ("late", "malformed_json", "late", "null_value", "late")]
    report = summarize(sink(dlq=letters))
    assert report["dead_letters"] == {
        "rows": 5,
        "by_reason": {"late": 3, "malformed_json": 1, "null_value": 1},
    }
    assert report["root"] == "/sink"
    assert report["paths"] == {
        "results": "/sink/results",
        "telemetry": "/sink/telemetry",
        "dlq": "/sink/dlq",
    }
