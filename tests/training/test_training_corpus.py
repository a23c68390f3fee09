"""The training corpus: bad files fail on the driver before any worker starts; samples and shards
are deterministic functions of (seed, step) and split each global batch between the ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.tokenizer import BOS_ID, EOS_ID, PAD_ID
from pipeline.sim.corpus import write_corpus
from pipeline.training.corpus import (
    ChunkSamples,
    CorpusError,
    RowSamples,
    ShardSampler,
    inspect_corpus,
    split_texts,
    training_document,
)
from pipeline.training.job import TrainRequest, run_training
from pipeline.training.reading import read_corpus
from pipeline.training.stages import CONFIG_DIR, load_train_config


@pytest.fixture(scope="module")
def domain_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "domain"
    write_corpus(out, seed=1, windows=40, fmt="jsonl")
    return out


def documents_file(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# -- checks before anything starts ------------------------------------------------------------


def test_a_missing_corpus_is_named(tmp_path):
    with pytest.raises(CorpusError, match=r"nope\.jsonl: corpus not found"):
        inspect_corpus(str(tmp_path / "nope.jsonl"))


def test_a_truncated_parquet_file_is_refused(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["a b c"] * 100}), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CorpusError, match=r"docs\.parquet: not a readable Parquet file"):
        inspect_corpus(str(path))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "body.jsonl",
            '{"body": "x"}\n',
            r"body\.jsonl: missing column\(s\) \['text'\]; has \['body'\]",
        ),
        ("empty.jsonl", "", r"empty\.jsonl: corpus file is empty"),
        ("docs.txt", "hello", r"docs\.txt: unsupported corpus format \.txt"),
        ("bad.jsonl", "{not json\n", r"bad\.jsonl: line 1 is not JSON"),
        ("list.jsonl", "[1, 2]\n", r"list\.jsonl: line 1 is not a JSON object"),
    ],
)
def test_wrong_columns_empty_files_and_formats_are_refused(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(CorpusError, match=message):
        inspect_corpus(str(tmp_path / name))


def test_a_domain_corpus_needs_its_valid_split(domain_corpus, tmp_path):
    source = inspect_corpus(str(domain_corpus))
    assert (
        source.kind == "domain"
        and set(source.files) == {"train", "valid", "test"}
        and source.has_facts
    )
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train.jsonl").write_bytes((domain_corpus / "train.jsonl").read_bytes())
    with pytest.raises(CorpusError, match="needs valid.parquet or valid.jsonl"):
        inspect_corpus(str(partial))


@pytest.mark.slow
def test_a_corrupt_record_fails_before_any_worker_starts(ray_local, tmp_path):
    good = [json.dumps({"text": f"document {i} " * 20}) for i in range(30)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(good[:15] + ['{"text": "unterminated'] + good[15:]) + "\n")
    config = load_train_config(CONFIG_DIR / "tiny.yaml")
    with pytest.raises(CorpusError, match=r"docs\.jsonl: cannot read the corpus"):
        run_training(TrainRequest(config, str(corpus), str(tmp_path / "runs"), "bad"))
    assert not (tmp_path / "runs").exists()  # no run record, no tokenizer, no Ray Train run


@pytest.mark.slow
def test_documents_split_by_document_and_render_domain_records(ray_local, tmp_path, domain_corpus):
    path = documents_file(tmp_path / "docs.jsonl", [f"doc {i}" for i in range(20)])
    table = read_corpus(inspect_corpus(str(path)), valid_fraction=0.1)
    assert split_texts(table, "valid") == ["doc 18", "doc 19"]
    assert split_texts(table, "train") == [f"doc {i}" for i in range(18)]
    domain = read_corpus(inspect_corpus(str(domain_corpus)), valid_fraction=0.1)
    records = [json.loads(line) for line in (domain_corpus / "test.jsonl").read_text().splitlines()]
    assert split_texts(domain, "test") == [
        training_document(r["prompt"], r["reference"]) for r in records
    ]
    assert all(r["prompt"].endswith("summary:") and r["facts"] for r in records)


# -- samples and shards -----------------------------------------------------------------------


def stream_of(docs: list[list[int]]) -> np.ndarray:
    return np.concatenate([[BOS_ID, *d, EOS_ID] for d in docs]).astype(np.int32)


def test_rows_are_left_padded_bos_then_a_stream_window():
    stream = stream_of([list(range(10 + i, 60 + i)) for i in range(6)])
    rows = RowSamples(stream, row_len=16, k=4, seed=3)
    batch = rows.batch(np.arange(len(rows)), epoch=0)
    pads = rows.left_pads(np.arange(len(rows)), epoch=0)
    assert set(pads) == {0, 1, 2, 3}
    for row, r, start in zip(batch, pads, rows.starts):
        assert (row[:r] == PAD_ID).all() and row[r] == BOS_ID
        np.testing.assert_array_equal(row[r + 1 :], stream[start : start + 16 - r - 1])
        assert stream[start] != BOS_ID  # never <bos><bos>
    assert not np.array_equal(pads, rows.left_pads(np.arange(len(rows)), epoch=1))
    ar_rows = RowSamples(stream, row_len=16, k=1, seed=3)
    assert (ar_rows.batch(np.arange(len(ar_rows)), 0)[:, 0] == BOS_ID).all()


def test_chunks_are_every_k_window_of_the_stream():
    stream = np.arange(20, dtype=np.int32)
    chunks = ChunkSamples(stream, 4)
    assert len(chunks) == 17
    np.testing.assert_array_equal(
        chunks.batch(np.array([0, 16]), 0), [[0, 1, 2, 3], [16, 17, 18, 19]]
    )


def test_shards_split_each_global_batch_and_cover_an_epoch_once():
    n, batch = 1000, 40
    one = ShardSampler(n, batch, world_size=1, rank=0, seed=7)
    ranks = [ShardSampler(n, batch, world_size=4, rank=r, seed=7) for r in range(4)]
    seen = []
    for step in range(one.steps_per_epoch):
        parts = [s.indices(step) for s in ranks]
        # the same global batch whatever the worker count: resuming on more workers keeps the data
        np.testing.assert_array_equal(np.concatenate(parts), one.indices(step))
        seen += np.concatenate(parts).tolist()
    assert len(seen) == len(set(seen)) == one.steps_per_epoch * batch
    assert not np.array_equal(
        one.indices(0), one.indices(one.steps_per_epoch)
    )  # a new epoch reshuffles
    np.testing.assert_array_equal(
        ShardSampler(n, batch, 4, 2, seed=7).indices(123), ranks[2].indices(123)
    )


def test_shards_refuse_batches_the_corpus_or_the_workers_cannot_fill():
    with pytest.raises(ValueError, match="not divisible by 3 workers"):
        ShardSampler(100, 10, world_size=3, rank=0, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch"):
        ShardSampler(5, 10, world_size=1, rank=0, seed=0)
