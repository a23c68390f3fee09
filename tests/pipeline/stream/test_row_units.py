"""Result rows, no model run: `result_row` has exactly the sink's `RESULT_SCHEMA` columns and a
pyarrow table of it validates; every column's value comes from its input (the window request,
the generated output, the model, the task and the timings); `row_seed` is a deterministic int64
of the row key and the model id; `faithfulness` scores summaries only."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from pipeline.kafka.positions import row_key
from pipeline.sinks.schemas import DETERMINISTIC_RESULT_COLUMNS, RESULT_SCHEMA
from pipeline.stream.flow import WindowRequest
from pipeline.stream.inference import Passthrough, row_seed
from pipeline.stream.rows import Generated, faithfulness, result_row

# pyarrow imports pandas on its first conversion from Python objects (seconds on a loaded
# box): paid here, at import, rather than inside whichever test converts first.
pa.array([0])
T0 = 1_700_000_040_000  # 2023-11-14T22:14:00Z
KEY = row_key("iot", 2, T0, "dev-1")


@dataclass(frozen=True)
class LoadedModel:
    """What `result_row` reads of a loaded bundle's model (the `Model` protocol's identity)."""

    name: str = "tiny"
    version: str = "7"
    k: int = 4
    summarizes: bool = True

    @property
    def id(self) -> str:
        return f"{self.name}-{self.version}"


def request(**changes: object) -> WindowRequest:
    """A closed IoT window: every field distinct, so a swapped column shows."""
    base = WindowRequest(
        key=KEY,
        topic="iot",
        partition=2,
        entity="dev-1",
        kind="iot",
        start_ms=T0,
        end_ms=T0 + 60_000,
        first_offset=11,
        last_offset=17,
        events=5,
        last_ingested_ms=T0 + 59_500,
        prompt="dev-1 window prompt",
        facts=("anomaly:none", "entity:dev-1", "number:3"),
        origin=1,
        closed_at=0.0,
    )
    return replace(base, **changes)


def generated(output: str = "dev-1 reported 3 readings, no anomalies.") -> Generated:
    return Generated(
        seed=row_seed(KEY, "tiny-7"),
        output=output,
        finish_reason="eos",
        tokens_in=101,
        tokens_out=23,
        steps=7,
        draws=9,
        flops=1.5e9,
        baseline_flops=6e9,
        prefill_seconds=0.25,
        decode_seconds=0.5,
    )


def row(model=LoadedModel(), task: str = "summarize", **changes: object) -> dict:
    finished_at = (T0 + 62_000) / 1000  # 2.5 s after the window's newest record was ingested
    return result_row(request(**changes), generated(), model, task, 0.125, finished_at)


@pytest.mark.parametrize("model", [LoadedModel(), Passthrough()], ids=["bundle", "passthrough"])
def test_the_row_has_the_sinks_columns_and_validates(model) -> None:
    values = row(model)
    assert list(values) == RESULT_SCHEMA.names
    table = pa.Table.from_pylist([values], schema=RESULT_SCHEMA)
    table.validate(full=True)
    assert table.to_pylist() == [values]  # nothing lost or coerced on the way


def test_every_column_comes_from_its_input() -> None:
    values = row()
    assert {n: values[n] for n in ("key", "topic", "partition", "entity", "kind")} == {
        "key": KEY,
        "topic": "iot",
        "partition": 2,
        "entity": "dev-1",
        "kind": "iot",
    }
    assert values["window_start"] == datetime(2023, 11, 14, 22, 14, tzinfo=UTC)
    assert values["window_end"] == datetime(2023, 11, 14, 22, 15, tzinfo=UTC)
    assert values["last_ingested"] == datetime(2023, 11, 14, 22, 14, 59, 500_000, tzinfo=UTC)
    assert (values["first_offset"], values["last_offset"], values["events"]) == (11, 17, 5)
    assert (values["task"], values["prompt"]) == ("summarize", "dev-1 window prompt")
    assert (values["output"], values["finish_reason"]) == (generated().output, "eos")
    assert values["facts"] == ["anomaly:none", "entity:dev-1", "number:3"]
    assert (values["model_name"], values["model_version"], values["k"]) == ("tiny", "7", 4)
    assert values["seed"] == row_seed(KEY, "tiny-7")
    counts = ("tokens_in", "tokens_out", "steps", "draws")
    assert [values[n] for n in counts] == [101, 23, 7, 9]
    timings = ("queue_seconds", "prefill_seconds", "decode_seconds")
    assert [values[n] for n in timings] == [0.125, 0.25, 0.5]
    assert values["latency_seconds"] == pytest.approx(2.5)


def test_a_row_finished_before_its_timestamp_has_zero_latency() -> None:
    """A producer clock ahead of the actor's: the latency is clamped, not negative."""
    assert row(last_ingested_ms=T0 + 3_600_000)["latency_seconds"] == 0.0


def test_the_deterministic_columns_do_not_depend_on_the_timings() -> None:
    a = result_row(request(), generated(), LoadedModel(), "summarize", 0.0, 0.0)
    b = result_row(request(closed_at=5.0), generated(), LoadedModel(), "summarize", 9.0, 1e10)
    assert {n: a[n] for n in DETERMINISTIC_RESULT_COLUMNS} == {
        n: b[n] for n in DETERMINISTIC_RESULT_COLUMNS
    }
    assert a["latency_seconds"] != b["latency_seconds"]


def test_the_seed_is_deterministic_and_fits_an_int64() -> None:
    seed = row_seed(KEY, "tiny-7")
    assert seed == row_seed(KEY, "tiny-7")
    assert 0 <= seed < 2**63
    # Pinned: a replay must draw the same noise as the rows already in a sink.
    assert row_seed("iot/0/1700000040000/dev-1", "tiny-1") == 7361819249359678860


@pytest.mark.parametrize(
    ("key", "model_id"),
    [
        (row_key("iot", 2, T0, "dev-2"), "tiny-7"),  # another entity
        (row_key("iot", 2, T0 + 60_000, "dev-1"), "tiny-7"),  # the next window
        (row_key("iot", 3, T0, "dev-1"), "tiny-7"),  # another partition
        (KEY, "tiny-8"),  # another model version
        (KEY, "small-7"),  # another model
    ],
)
def test_the_seed_differs_when_the_key_or_the_model_differs(key, model_id) -> None:
    assert row_seed(key, model_id) != row_seed(KEY, "tiny-7")


@pytest.mark.parametrize(
    ("output", "accuracy", "invented"),
    [
        ("dev-1 reported 3 readings, no anomalies.", 1.0, 0),  # the three facts, nothing else
        ("dev-1 reported 4 readings, no anomalies.", 2 / 4, 1),  # 2 matched of a union of 4
        ("dev-1 reported 3 readings, 8 late, no anomalies.", 3 / 4, 1),  # one fact too many
        ("Nothing to say", 0 / 3, 0),  # states nothing: all three missed
    ],
)
def test_faithfulness_scores_a_summary_against_the_windows_facts(output, accuracy, invented):
    scored = faithfulness(request(), generated(output), LoadedModel(), "summarize")
    assert scored == {"fact_accuracy": pytest.approx(accuracy), "invented_facts": invented}


@pytest.mark.parametrize(
    ("model", "task"), [(LoadedModel(), "generate"), (Passthrough(), "summarize")]
)
def test_faithfulness_is_null_where_nothing_was_summarized(model, task) -> None:
    assert faithfulness(request(), generated(), model, task) == {
        "fact_accuracy": None,
        "invented_facts": None,
    }
    values = result_row(request(), generated(), model, task, 0.0, 0.0)
    assert values["fact_accuracy"] is None and values["invented_facts"] is None
    assert values["model_name"] == model.name and values["task"] == task
