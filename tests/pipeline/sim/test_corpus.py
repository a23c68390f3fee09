"""Corpus export (held out by entity), the eval command, and K-chunk alignment."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from model.chunking import left_pad_to_multiple, num_left_pads, split_chunks
from operators.corpus import SPLITS, assign_splits
from operators.facts import score
from pipeline.cli.domain import corpus_app, eval_app
from pipeline.sim.corpus import read_records

app = typer.Typer()
app.add_typer(corpus_app, name="corpus")
app.add_typer(eval_app, name="eval")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple:
    out = tmp_path_factory.mktemp("corpus")
    result = CliRunner().invoke(
        app, ["corpus", "build", "--out", str(out), "--seed", "5", "--windows", "600"]
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_corpus_splits_are_held_out_by_entity(corpus) -> None:
    out, manifest = corpus
    splits = {s: pq.read_table(out / f"{s}.parquet").to_pylist() for s in SPLITS}
    assert {s: len(rows) for s, rows in splits.items()} == manifest["windows"]
    assert sum(manifest["windows"].values()) == 600 and manifest["kinds"] == {
        "iot": 300,
        "transaction": 300,
    }
    entities = {s: {r["entity"] for r in rows} for s, rows in splits.items()}
    assert not (
        entities["train"] & entities["valid"]
        or entities["train"] & entities["test"]
        or entities["valid"] & entities["test"]
    )
    for split, rows in splits.items():
        assert rows and all(r["split"] == split for r in rows)
        assert {r["kind"] for r in rows} == {"iot", "transaction"}
    train = splits["train"]
    assert 0.7 < len(train) / 600 < 0.9
    assert all(
        score(r["reference"], r["facts"]).accuracy == 1.0 for rows in splits.values() for r in rows
    )
    assert sum(bool(r["anomalies"]) for r in train) > 0.1 * len(train)


def test_corpus_is_reproducible_and_jsonl_matches_parquet(corpus, tmp_path) -> None:
    out, _ = corpus
    args = [
        "corpus",
        "build",
        "--out",
        str(tmp_path),
        "--seed",
        "5",
        "--windows",
        "600",
        "--format",
        "jsonl",
        "--vocab-size",
        "0",
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
    for split in SPLITS:
        assert read_records(tmp_path / f"{split}.jsonl") == read_records(out / f"{split}.parquet")


def test_prompts_and_summaries_fit_the_small_model(corpus) -> None:
    _, manifest = corpus
    tokens = manifest["tokens"]
    assert tokens["tokenizer"].startswith("model.tokenizer")
    for split in SPLITS:
        for field in ("prompt", "reference"):
            assert tokens[f"{split}.{field}"]["max"] < 120, (
                split,
                field,
                tokens[f"{split}.{field}"],
            )


def test_assign_splits_is_seeded_and_exact() -> None:
    entities = [f"dev-{i:04d}" for i in range(1000)]
    a = assign_splits(entities, seed=1)
    assert a == assign_splits(reversed(entities), seed=1) != assign_splits(entities, seed=2)
    counts = {s: sum(v == s for v in a.values()) for s in SPLITS}
    assert counts == {"train": 800, "valid": 100, "test": 100}
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(entities, seed=1, fractions=(0.5, 0.5, 0.5))


def test_eval_summaries_scores_a_file_of_outputs(corpus, tmp_path) -> None:
    out, _ = corpus
    rows = read_records(out / "test.parquet")
    outputs = tmp_path / "outputs.jsonl"
    with outputs.open("w") as f:
        for i, r in enumerate(rows):  # every other output has its entity replaced
            text = r["reference"] if i % 2 else r["reference"].replace(r["entity"], "dev-9999")
            f.write(json.dumps({"facts": r["facts"], "output": text}) + "\n")
    result = CliRunner().invoke(app, ["eval", "summaries", str(outputs)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == len(rows) and report["exact"] == pytest.approx(
        len(rows) // 2 / len(rows), abs=1e-4
    )
    assert 0.5 < report["fact_accuracy"] < 1.0
    perfect = CliRunner().invoke(
        app, ["eval", "summaries", str(out / "test.parquet"), "--column", "reference"]
    )
    assert json.loads(perfect.stdout)["fact_accuracy"] == 1.0
    missing = CliRunner().invoke(app, ["eval", "summaries", str(outputs), "--column", "text"])
    assert missing.exit_code == 2 and "missing column" in missing.output


@pytest.mark.parametrize("length", range(13))
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_left_padding_aligns_to_k(length: int, k: int) -> None:
    ids = np.arange(10, 10 + length)
    padded = left_pad_to_multiple(ids, k, pad_id=0)
    pads = num_left_pads(length, k)
    assert len(padded) % k == 0 and 0 <= pads < k and len(padded) == length + pads
    assert (padded[:pads] == 0).all() and (padded[pads:] == ids).all()
    chunks = split_chunks(padded, k)
    assert chunks.shape == (len(padded) // k, k) and (chunks.reshape(-1) == padded).all()


def test_chunking_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple"):
        split_chunks([1, 2, 3], 2)
    with pytest.raises(ValueError, match="k must be"):
        left_pad_to_multiple([1], 0, pad_id=0)
    with pytest.raises(ValueError, match="1-D"):
        left_pad_to_multiple([[1, 2]], 2, pad_id=0)
