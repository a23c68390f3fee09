"""Byte-level BPE tokenizer (the `tokenizers` library), stored as one JSON file.

Special ids follow the project convention: <pad>=0, <bos>=1, <eos>=2, <mask>=3 (the
autoencoder's token dropout). Text is encoded WITHOUT special-token parsing, so an event that
contains the string "<eos>" stays ordinary text and cannot end a generation early, and
decode(encode(s)) == s for any Python string (no normalizer; byte-level pre-tokenizer, digits
split one by one).

No torch import: the serving path (onnxruntime workers) uses this module.
"""

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD, BOS, EOS, MASK = "<pad>", "<bos>", "<eos>", "<mask>"
SPECIAL_TOKENS = (PAD, BOS, EOS, MASK)
PAD_ID, BOS_ID, EOS_ID, MASK_ID = range(4)


class Tokenizer:
    """A thin wrapper that fixes the special ids and the exact-round-trip settings."""

    def __init__(self, hf: HFTokenizer):
        for want_id, token in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(token) != want_id:
                raise ValueError(f"tokenizer must map {token!r} to id {want_id}")
        hf.encode_special_tokens = True  # "<eos>" inside user text is text, not EOS
        self.hf = hf
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = PAD_ID, BOS_ID, EOS_ID, MASK_ID

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train a byte-level BPE with `vocab_size` entries (specials and the 256 bytes included)."""
        if vocab_size < len(SPECIAL_TOKENS) + 256:
            raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256}, got {vocab_size}")
        hf = HFTokenizer(models.BPE())
        # Digits one by one: the facts of a summary are numbers and ids copied from the prompt, and
        # a 10-token alphabet is far easier to copy (and to reconstruct through the autoencoder)
        # than hundreds of rare multi-digit tokens.
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; the four special ids are dropped."""
        return self.hf.decode(
            [i for i in ids if i >= len(SPECIAL_TOKENS)], skip_special_tokens=False
        )

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]
