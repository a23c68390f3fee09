"""Byte-level BPE: exact round trip on arbitrary text, fixed special ids, one-file save/load."""

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import REPO

from model.data import wikitext_documents
from model.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, SPECIAL_TOKENS, Tokenizer

ODD_TEXTS = [
    "",
    " ",
    "\t\n\r\x0b\x0c  trailing  ",
    "\u00a0\u2003\u3000 unusual spaces",
    "日本語のテキスト、中文文本。한국어",
    "emoji 🎉👩‍👩‍👧‍👦🏳️‍🌈 and combining e\u0301",
    "\x00 NUL and \x7f DEL",
    "<pad><bos><eos><mask> are text here",
    "ﷺ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(wikitext_documents()[:10], vocab_size=600)


def test_special_ids(tokenizer: Tokenizer) -> None:
    assert (PAD_ID, BOS_ID, EOS_ID, MASK_ID) == (0, 1, 2, 3)
    assert [tokenizer.hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tokenizer.vocab_size == 600


def test_special_strings_in_text_are_not_special(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("a <eos> b <pad>")
    assert not set(ids) & {PAD_ID, BOS_ID, EOS_ID, MASK_ID}
    assert tokenizer.decode([BOS_ID, *ids, EOS_ID, PAD_ID]) == "a <eos> b <pad>"


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_round_trip_odd_text(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_round_trip_arbitrary_unicode(tokenizer: Tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_save_load_one_json_file(tokenizer: Tokenizer, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    loaded = Tokenizer.load(path)
    text = ODD_TEXTS[5] + " The game 's release was delayed ."
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.vocab_size == tokenizer.vocab_size


def test_bad_vocab_size() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_module_does_not_import_torch() -> None:
    code = "import sys, model.tokenizer; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
