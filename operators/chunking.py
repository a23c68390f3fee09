"""K-chunk alignment of token ids.

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
