"""K-chunk alignment of token ids: the model's own padding protocol (prompt in, chunks out).

CALM predicts one continuous vector per chunk of K tokens. A prompt is therefore
LEFT-padded with the pad id to a multiple of K, so that its last token closes a
chunk and generation starts on a chunk boundary (the model is trained with a
random 0..K-1 left pads before <bos>, so it has seen exactly this).
"""

from collections.abc import Sequence

import numpy as np


def num_left_pads(length: int, k: int) -> int:
    """Number of pads needed in front of `length` ids to reach a multiple of `k` (0..k-1)."""
    if k < 1:
        raise ValueError(f"chunk size k must be >= 1, got {k}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    return -length % k


def left_pad_to_multiple(ids: Sequence[int] | np.ndarray, k: int, pad_id: int) -> np.ndarray:
    """Return `ids` left-padded with `pad_id` so that its length is a multiple of `k`.

    The result is a new 1-D int64 array; already aligned input is returned unpadded (as a copy).
    """
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    pads = num_left_pads(arr.shape[0], k)
    return np.concatenate([np.full(pads, pad_id, dtype=np.int64), arr])


def split_chunks(ids: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """Reshape 1-D `ids` whose length is a multiple of `k` into an array of shape [n_chunks, k]."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    if k < 1:
        raise ValueError(f"chunk size k must be >= 1, got {k}")
    if arr.shape[0] % k:
        raise ValueError(
            f"length {arr.shape[0]} is not a multiple of k={k}; left_pad_to_multiple first"
        )
    return arr.reshape(-1, k)


def pad_prompts(
    prompts: Sequence[Sequence[int]], k: int, pad_id: int, length: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(chunks [B, n, k] int64, chunk mask [B, n] bool) of a ragged batch: each prompt left-padded
    to a multiple of k, then the batch left-padded with whole pad chunks (mask False), so that
    every row's last chunk lines up at the end; n is the longest prompt's chunks, or `length`
    where that is more."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (normally <bos>)")
    aligned = [left_pad_to_multiple(p, k, pad_id).reshape(-1, k) for p in prompts]
    n = max(length, *(len(a) for a in aligned))
    chunks = np.full((len(prompts), n, k), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), n), dtype=bool)
    for i, a in enumerate(aligned):
        chunks[i, n - len(a) :] = a
        mask[i, n - len(a) :] = True
    return chunks, mask


def accept_chunk(
    chunk: Sequence[int], room: int, eos_id: int, stop_on_eos: bool
) -> tuple[list[int], bool]:
    """The part of a generated chunk that a row keeps: at most `room` tokens (no overshoot past
    the row's limit), cut before its first <eos>; and whether that <eos> ended the row."""
    tokens = list(chunk)[:room]
    if stop_on_eos and eos_id in tokens:
        return tokens[: tokens.index(eos_id)], True
    return tokens, False
