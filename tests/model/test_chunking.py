"""K-chunk alignment: ragged batches line up on chunk boundaries, chunks never overshoot."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from model.chunking import accept_chunk, pad_prompts

PAD, EOS = 0, 2
prompts = st.lists(st.lists(st.integers(4, 99), min_size=1, max_size=13), min_size=1, max_size=6)


@given(prompts, st.integers(1, 5))
def test_ragged_prompts_end_on_a_chunk_boundary_and_keep_their_tokens(batch, k):
    chunks, mask = pad_prompts(batch, k, PAD)
    assert chunks.shape[0] == len(batch) and chunks.shape[2] == k and mask.dtype == bool
    for row, prompt in zip(range(len(batch)), batch):
        flat = chunks[row][mask[row]].reshape(-1)
        pads = -len(prompt) % k
        assert flat.tolist() == [PAD] * pads + prompt  # left pads inside the first real chunk
        assert mask[row, -1] and not mask[row, : mask.shape[1] - mask[row].sum()].any()


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="at least one token"):
        pad_prompts([[5], []], 4, PAD)


@given(st.lists(st.integers(3, 9), min_size=1, max_size=8), st.integers(0, 10), st.booleans())
def test_accepted_chunk_respects_the_room_and_stops_before_eos(body, room, stop):
    chunk = body[:2] + [EOS] + body[2:]
    tokens, ended = accept_chunk(np.array(chunk).tolist(), room, EOS, stop)
    assert len(tokens) <= room
    if stop:
        eos_at = chunk.index(EOS)
        assert ended == (eos_at < room) and tokens == chunk[: min(room, eos_at)]
    else:
        assert not ended and tokens == chunk[:room]
