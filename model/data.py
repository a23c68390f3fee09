"""Training data: documents -> one token stream -> packed rows with random left pads.

The stream is <bos> doc <eos> <bos> doc <eos> ..., so the models learn to end a document (and
generation can stop on <eos>). A training row is

    <pad> * r  <bos>  stream[s : s + T - r - 1]

with s a random stream position and r uniform in 0..K-1. A prompt at inference is <bos> + text,
left-padded to a multiple of K (model.chunking.left_pad_to_multiple): exactly this shape, so
every prompt length puts the model on padding it was trained on. r = 0 for the AR baseline.
"""

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

# A batch of token ids, or (ids, targets): the target mask marks the tokens the loss learns.
Batch = np.ndarray | tuple[np.ndarray, np.ndarray]


# Package data (model/corpora, with its attribution and licence), found in a checkout and an install.
CORPORA_DIR = Path(__file__).resolve().parent / "corpora"


def read_documents(path: str | Path) -> list[str]:
    """Documents of a JSON-lines file with one {"text": ...} object per line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def wikitext_path() -> Path:
    """The WikiText-103 test documents (the paper's evaluation text), shipped as package data."""
    path = CORPORA_DIR / "wikitext103-test-documents.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: it ships with calm-stream (model/corpora); reinstall the package "
            "(`pip install calm-stream` or `make venv` in a checkout) or pass your own documents "
            "file with --corpus"
        )
    return path


def wikitext_documents() -> list[str]:
    return read_documents(wikitext_path())


def split_documents(docs: Sequence[str], n_heldout: int) -> tuple[list[str], list[str]]:
    """(train, held-out) by document: the last `n_heldout` documents are held out."""
    if not 0 < n_heldout < len(docs):
        raise ValueError(f"n_heldout must be in 1..{len(docs) - 1}, got {n_heldout}")
    return list(docs[:-n_heldout]), list(docs[-n_heldout:])


def token_stream(tokenizer: Tokenizer, docs: Sequence[str]) -> np.ndarray:
    """<bos> doc <eos> for every document, concatenated (int64)."""
    parts = [
        np.array([BOS_ID, *ids, EOS_ID], dtype=np.int64) for ids in tokenizer.encode_batch(docs)
    ]
    return np.concatenate(parts)


def pack_rows(
    stream: np.ndarray,
    n_rows: int,
    row_len: int,
    k: int,
    rng: np.random.Generator,
    left_pads: int | None = None,
) -> np.ndarray:
    """[n_rows, row_len] rows: `left_pads` (random 0..k-1 if None) pads, <bos>, stream window."""
    if row_len % k:
        raise ValueError(f"row_len {row_len} must be a multiple of k={k}")
    if left_pads is not None and not 0 <= left_pads < k:
        raise ValueError(f"left_pads must be in 0..{k - 1}, got {left_pads}")
    starts = np.flatnonzero(stream[: len(stream) - row_len] != BOS_ID)  # avoid <bos><bos>
    if len(starts) == 0:
        raise ValueError(f"stream of {len(stream)} tokens is too short for rows of {row_len}")
    s = rng.choice(starts, size=n_rows)
    r = rng.integers(0, k, size=n_rows)  # drawn either way: same windows with fixed pads
    if left_pads is not None:
        r[:] = left_pads
    return rows_at(stream, s, r, row_len)


def rows_at(
    stream: np.ndarray,
    starts: np.ndarray,
    pads: np.ndarray,
    row_len: int,
    pad: int | bool = PAD_ID,
    bos: int | bool = BOS_ID,
) -> np.ndarray:
    """Training rows by the left-padding rule: row i is `pads[i]` <pad>s, <bos>, then the stream
    from `starts[i]`, `row_len` tokens in all. `pad` and `bos` are the values written for them
    (False, False to cut a per-token mask of the stream the same way)."""
    r = pads[:, None]
    j = np.arange(row_len)
    rows = stream[starts[:, None] + j - r - 1]  # indices below the start only where replaced next
    rows[j < r] = pad
    rows[j == r] = bos
    return rows


def document_layout(
    stream: np.ndarray, offsets: np.ndarray, summary_starts: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Documents laid out on chunk boundaries, as generation sees them.

    Document i (`stream[offsets[i]:offsets[i+1]]`, `<bos> prompt summary <eos>`) becomes
    `<pad>*r  document  <pad>*q`: r = -summary_start mod K puts the summary on a chunk boundary,
    exactly where a prompt left-padded to a multiple of K (model.chunking) puts the first
    generated chunk, and q fills the document's last chunk. Returns (ids, summary, starts): the
    laid-out tokens, a mask of each summary's tokens (<eos> included) and each document's start.
    """
    lengths = np.diff(offsets)
    r = -summary_starts % k
    q = -(r + lengths) % k
    sizes = r + lengths + q
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    doc = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(offsets[-1]) - offsets[doc]
    dest = starts[doc] + r[doc] + within
    ids = np.full(int(sizes.sum()), PAD_ID, dtype=stream.dtype)
    ids[dest] = stream[: offsets[-1]]
    summary = np.zeros(len(ids), dtype=bool)
    summary[dest] = within >= summary_starts[doc]
    return ids, summary, starts


def sample_chunks(stream: np.ndarray, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, k] windows of the stream at random offsets (autoencoder training data)."""
    s = rng.integers(0, len(stream) - k + 1, size=n)
    return stream[s[:, None] + np.arange(k)]


def row_batches(
    stream: np.ndarray, batch_size: int, row_len: int, k: int, seed: int, random_pads: bool = True
) -> Iterator[np.ndarray]:
    """Endless packed batches (random pads 0..k-1 unless `random_pads` is False)."""
    rng = np.random.default_rng(seed)
    while True:
        yield pack_rows(stream, batch_size, row_len, k, rng, None if random_pads else 0)


def chunk_batches(stream: np.ndarray, batch_size: int, k: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    while True:
        yield sample_chunks(stream, batch_size, k, rng)


def wikitext_streams(
    vocab_size: int, n_heldout: int = 6
) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """(tokenizer trained on the training documents, train stream, held-out stream)."""
    train, heldout = split_documents(wikitext_documents(), n_heldout)
    tokenizer = Tokenizer.train(train, vocab_size)
    return tokenizer, token_stream(tokenizer, train), token_stream(tokenizer, heldout)
