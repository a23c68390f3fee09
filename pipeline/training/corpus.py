"""The training corpus: checked on the driver, tokenized, indexed by step (no Ray here: the job
reads and tokenizes with Ray Data in pipeline.training.reading; the recipe study needs none).

Two kinds of corpus:
- a domain corpus directory as `calm-stream corpus build` writes it: train/valid/test files
  (Parquet or JSONL) of (prompt, reference, facts) records, held out by entity. A training
  document is the prompt, one space, then the reference summary: at inference the model reads
  `<bos> prompt` and writes ` summary... <eos>`.
- one Parquet/JSONL file of plain documents (field `text`, e.g. the WikiText-103 test documents
  shipped in model/corpora), split by document: the last `valid_fraction` of the documents are held out.

Data order is deterministic, so that a resumed job trains on exactly the batches an
uninterrupted one would have:
1. `inspect_corpus` checks every file on the driver (exists, format, readable, columns) before
   any worker starts.
2. Ray Data reads every file (one read, order preserved) and tokenizes (map_batches,
   pipeline.training.reading); per split
   the token ids are materialized as one stream `<bos> doc <eos> <bos> doc <eos> ...` (int32),
   which the job puts in the object store once. The corpus passes through the driver's memory,
   which bounds its size (fine for the corpora here: the domain corpus is ~2M tokens).
3. A sample is an index: a K-token window of the stream (autoencoder) or a packed row (CALM, AR).
   `ShardSampler` cuts a seeded per-epoch permutation of all sample indices into global batches
   indexed by the global step; rank r takes the r-th contiguous slice of each global batch. Step s
   therefore always sees the same global batch, whatever the number of workers, and within an
   epoch no two ranks see the same sample.
Ray Data's streaming split is not used for training because its order cannot be resumed at a step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from tokenizers import Tokenizer as HFTokenizer

from model.config import ARConfig, AutoencoderConfig, CALMConfig
from model.data import Batch, document_layout, rows_at
from model.filesystems import split_uri
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from pipeline.training.stages import TrainSpec

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
DOMAIN_COLUMNS = ("prompt", "reference")
SPLITS = ("train", "valid", "test")


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file and what is wrong."""


def training_document(prompt: str, reference: str) -> str:
    """The text a domain record trains on; generation continues `prompt` with ' reference'."""
    return f"{prompt} {reference}"


@dataclass(frozen=True)
class CorpusFile:
    path: str
    format: Literal["parquet", "jsonl"]
    columns: tuple[str, ...]


@dataclass(frozen=True)
class CorpusSource:
    """A checked corpus: its kind and, per split, the file that holds it."""

    kind: Literal["domain", "documents"]
    location: str
    fs: pafs.FileSystem
    files: dict[str, CorpusFile]  # domain: train/valid[/test]; documents: "all"

    @property
    def has_facts(self) -> bool:
        return self.kind == "domain" and "facts" in self.files["valid"].columns


def _format_of(path: str) -> Literal["parquet", "jsonl"]:
    suffix = posixpath.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise CorpusError(
            f"{path}: unsupported corpus format {suffix or '(none)'}; use .parquet or .jsonl"
        )
    return FORMATS[suffix]  # type: ignore[return-value]


def _check_file(fs: pafs.FileSystem, path: str, required: tuple[str, ...]) -> CorpusFile:
    """Open the file far enough to know it is readable and has the columns; never read it all."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"{path}: corpus file not found")
    if info.type != pafs.FileType.File:
        raise CorpusError(f"{path}: not a file")
    if info.size == 0:
        raise CorpusError(f"{path}: corpus file is empty")
    fmt = _format_of(path)
    if fmt == "parquet":
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                columns = tuple(meta.schema.to_arrow_schema().names)
                rows = meta.num_rows
        except (pa.ArrowException, OSError) as error:
            raise CorpusError(f"{path}: not a readable Parquet file ({error})") from None
        if rows == 0:
            raise CorpusError(f"{path}: Parquet file has no rows")
    else:
        with fs.open_input_stream(path) as f:
            head = f.read(1 << 20).decode("utf-8", errors="replace")
        first = next((line for line in head.splitlines() if line.strip()), "")
        try:
            record = json.loads(first)
        except json.JSONDecodeError as error:
            raise CorpusError(f"{path}: line 1 is not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{path}: line 1 is not a JSON object")
        columns = tuple(record)
    missing = [c for c in required if c not in columns]
    if missing:
        raise CorpusError(f"{path}: missing column(s) {missing}; has {list(columns)}")
    return CorpusFile(path, fmt, columns)


def _find_split(fs: pafs.FileSystem, directory: str, split: str) -> str | None:
    for suffix in FORMATS:
        candidate = posixpath.join(directory, split + suffix)
        if fs.get_file_info(candidate).type == pafs.FileType.File:
            return candidate
    return None


def inspect_corpus(location: str) -> CorpusSource:
    """Check a corpus on the driver: a domain corpus directory or one file of documents."""
    try:
        fs, path = split_uri(location)
    except ValueError as error:
        raise CorpusError(f"corpus {error}") from None
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"{location}: corpus not found")
    if info.type == pafs.FileType.File:
        return CorpusSource("documents", location, fs, {"all": _check_file(fs, path, ("text",))})
    files = {}
    for split in SPLITS:
        found = _find_split(fs, path, split)
        if found is None and split != "test":
            raise CorpusError(
                f"{location}: a corpus directory needs {split}.parquet or {split}.jsonl "
                "(as `calm-stream corpus build` writes it)"
            )
        if found is not None:
            files[split] = _check_file(fs, found, DOMAIN_COLUMNS)
    return CorpusSource("domain", location, fs, files)


def domain_table(records: pa.Table, splits: list[str]) -> pa.Table:
    """Domain records as training documents: split, text, prompt (and facts, if recorded)."""
    text = [
        training_document(p, r)
        for p, r in zip(records["prompt"].to_pylist(), records["reference"].to_pylist())
    ]
    keep = {
        "prompt": records["prompt"],
        **({"facts": records["facts"]} if "facts" in records.column_names else {}),
    }
    return pa.table({"split": splits, "text": text, **keep})


def split_names(table: pa.Table) -> list[str]:
    return [s for s in SPLITS if s in set(table["split"].to_pylist())]


def split_texts(table: pa.Table, split: str) -> list[str]:
    return table.filter(pc.equal(table["split"], split))["text"].to_pylist()


@functools.lru_cache(maxsize=2)
def tokenizer_from_json(tokenizer_json: str) -> Tokenizer:
    return Tokenizer(HFTokenizer.from_str(tokenizer_json))


def tokenize_records(batch: pa.Table, tokenizer_json: str) -> pa.Table:
    """ids = <bos> text <eos>; domain records also get prompt_ids = <bos> prompt."""
    tokenizer = tokenizer_from_json(tokenizer_json)
    docs = [[BOS_ID, *ids, EOS_ID] for ids in tokenizer.encode_batch(batch["text"].to_pylist())]
    columns = {"split": batch["split"], "ids": pa.array(docs, type=pa.list_(pa.int32()))}
    if "prompt" in batch.column_names:
        prompts = tokenizer.encode_batch(batch["prompt"].to_pylist())
        columns["prompt_ids"] = pa.array(
            [[BOS_ID, *ids] for ids in prompts], type=pa.list_(pa.int32())
        )
    if "facts" in batch.column_names:
        columns["facts"] = batch["facts"]
    return pa.table(columns)


@dataclass(frozen=True)
class TokenCorpus:
    """One split, tokenized: the packed stream and each document's start in it."""

    stream: np.ndarray  # int32 <bos> doc <eos> <bos> doc <eos> ...
    offsets: np.ndarray  # int64 [documents + 1]
    prompts: list[np.ndarray] = field(default_factory=list)  # domain: <bos> prompt ids
    facts: list[list[str]] = field(default_factory=list)  # domain: the reference facts

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, i: int) -> np.ndarray:
        return self.stream[self.offsets[i] : self.offsets[i + 1]]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.stream.tobytes() + self.offsets.tobytes()).hexdigest()[:16]

    @functools.cached_property
    def summary_starts(self) -> np.ndarray:
        """Per document, where its summary starts: after `<bos> prompt` (the prompt the model reads
        at inference), or 0 for plain documents (every token is text to learn)."""
        if not self.prompts:
            return np.zeros(self.documents, dtype=np.int64)
        starts = np.empty(self.documents, dtype=np.int64)
        for i, prompt in enumerate(self.prompts):
            head = self.document(i)[: len(prompt)]
            same = head == prompt[: len(head)]
            starts[i] = len(head) if same.all() else int(np.argmin(same))
        return starts

    @functools.cached_property
    def summary_mask(self) -> np.ndarray:
        """Per stream token: part of a summary (its <eos> included)."""
        doc = np.repeat(np.arange(self.documents), np.diff(self.offsets))
        within = np.arange(len(self.stream)) - self.offsets[doc]
        return within >= self.summary_starts[doc]


def token_corpus(table: pa.Table) -> TokenCorpus:
    """One split's tokenized records (tokenize_records) as a TokenCorpus."""
    ids = table["ids"].combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    stream = pc.list_flatten(ids).to_numpy().astype(np.int32)
    prompts = (
        [np.asarray(p, dtype=np.int64) for p in table["prompt_ids"].to_pylist()]
        if "prompt_ids" in table.column_names
        else []
    )
    facts = table["facts"].to_pylist() if "facts" in table.column_names else []
    return TokenCorpus(stream, offsets, prompts, facts)


# ---------------------------------------------------------------------------------------------
# Samples and shards


@dataclass(frozen=True)
class ChunkSamples:
    """Autoencoder samples: sample i is the K-token window stream[i : i + K]."""

    stream: np.ndarray
    k: int

    def __len__(self) -> int:
        return max(0, len(self.stream) - self.k + 1)

    def tokens_per_sample(self) -> int:
        return self.k

    def batch(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        return self.stream[indices[:, None] + np.arange(self.k)].astype(np.int64)


@dataclass(frozen=True)
class RowSamples:
    """CALM / AR samples: row i is `<pad> * r  <bos>  stream[start_i : start_i + T - r - 1]`.

    Rows start every T - K tokens (a row covers at least T - K stream tokens), one token later
    where that token is a <bos> (no <bos><bos>); r, the number of left pads, is drawn uniformly in
    0..K-1 per (seed, epoch, row), so every prompt alignment is trained (model/data.py's packing).
    With `targets` (a per-token mask of the stream) a batch is (rows, the rows' target mask).
    """

    stream: np.ndarray
    row_len: int
    k: int
    seed: int
    targets: np.ndarray | None = None

    @functools.cached_property
    def starts(self) -> np.ndarray:
        stride = max(1, self.row_len - self.k)
        starts = np.arange(0, len(self.stream) - self.row_len, stride)
        return starts + (self.stream[starts] == BOS_ID)

    def __len__(self) -> int:
        return len(self.starts)

    def tokens_per_sample(self) -> int:
        return self.row_len

    def left_pads(self, indices: np.ndarray, epoch: int) -> np.ndarray:
        if self.k == 1:
            return np.zeros(len(indices), dtype=np.int64)
        pads = np.random.default_rng([self.seed, epoch, 1]).integers(0, self.k, size=len(self))
        return pads[indices]

    def batch(self, indices: np.ndarray, epoch: int) -> Batch:
        pads, starts = self.left_pads(indices, epoch), self.starts[indices]
        rows = rows_at(self.stream, starts, pads, self.row_len).astype(np.int64)
        if self.targets is None:
            return rows
        return rows, rows_at(self.targets, starts, pads, self.row_len, pad=False, bos=False)


@dataclass(frozen=True)
class DocumentRows:
    """CALM / AR samples that start at a document: row i is document i and the documents after
    it, laid out on chunk boundaries (model.data.document_layout), `row_len` tokens; a prompt is
    never cut off. With `summary_only`, a batch is (rows, mask of the summaries' tokens)."""

    corpus: TokenCorpus
    row_len: int
    k: int
    summary_only: bool = False

    @functools.cached_property
    def layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, summary, starts = document_layout(
            self.corpus.stream, self.corpus.offsets, self.corpus.summary_starts, self.k
        )
        tail = np.full(self.row_len, PAD_ID, dtype=ids.dtype)  # the last rows run past the end
        return np.concatenate([ids, tail]), np.concatenate([summary, tail.astype(bool)]), starts

    def __len__(self) -> int:
        return self.corpus.documents

    def tokens_per_sample(self) -> int:
        return self.row_len

    def batch(self, indices: np.ndarray, epoch: int) -> Batch:
        ids, summary, starts = self.layout
        window = starts[indices][:, None] + np.arange(self.row_len)
        rows = ids[window].astype(np.int64)
        return (rows, summary[window]) if self.summary_only else rows


@dataclass(frozen=True)
class ShardSampler:
    """Global batch of step s = slice s of a seeded per-epoch permutation; rank r takes slice r."""

    n_samples: int
    global_batch: int
    world_size: int
    rank: int
    seed: int

    def __post_init__(self) -> None:
        if self.global_batch % self.world_size:
            raise ValueError(
                f"batch_size {self.global_batch} is not divisible by {self.world_size} workers"
            )
        if self.n_samples < self.global_batch:
            raise ValueError(
                f"the corpus has {self.n_samples} samples, "
                f"fewer than one batch of {self.global_batch}"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.n_samples // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return _permutation(self.n_samples, self.seed, epoch)

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> np.ndarray:
        epoch, j = divmod(step, self.steps_per_epoch)
        batch = self.permutation(epoch)[j * self.global_batch : (j + 1) * self.global_batch]
        per_rank = self.global_batch // self.world_size
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]


@functools.lru_cache(maxsize=2)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of all sample indices (cached: every step of an epoch reads it)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def sample_space(
    stage: str,
    corpus: TokenCorpus,
    config: AutoencoderConfig | CALMConfig | ARConfig,
    spec: TrainSpec,
    seed: int,
) -> ChunkSamples | RowSamples | DocumentRows:
    if stage == "autoencoder":
        return ChunkSamples(autoencoder_stream(corpus, config.k), config.k)
    summary_only = spec.loss_on == "summary"
    if spec.rows == "documents":
        return DocumentRows(corpus, spec.row_len, config.k, summary_only)
    targets = corpus.summary_mask if summary_only else None
    return RowSamples(corpus.stream, spec.row_len, config.k, seed, targets)


def autoencoder_stream(corpus: TokenCorpus, k: int) -> np.ndarray:
    """The autoencoder learns the chunks CALM reads and writes in either row layout: the token
    stream and, for a domain corpus, its documents laid out on chunk boundaries (a summary's last
    chunk ends in <eos> and padding)."""
    if not corpus.prompts:
        return corpus.stream
    laid_out, _, _ = document_layout(corpus.stream, corpus.offsets, corpus.summary_starts, k)
    return np.concatenate([corpus.stream, laid_out])
