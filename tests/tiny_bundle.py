"""An untrained tiny CALM exported as a bundle: for tests of hashing and of the serving path,
which do not care whether the model was trained."""

from pathlib import Path

import torch

from model.bundle import Bundle
from model.calm import CALM
from model.config import AutoencoderConfig, BackboneConfig, CALMConfig
from model.export import export_bundle
from model.tokenizer import Tokenizer

VOCAB = 280


def export_untrained_bundle(root: Path, texts: list[str], name: str, version: str) -> Bundle:
    """Train a 280-entry BPE on `texts`, export a seeded random tiny CALM under `root`/out."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tokenizer_path = root / "tokenizer.json"
    if not tokenizer_path.exists():
        Tokenizer.train(texts, VOCAB).save(tokenizer_path)
    config = CALMConfig(
        backbone=BackboneConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32),
        autoencoder=AutoencoderConfig(vocab_size=VOCAB, latent_dim=4, d_model=16, d_ff=32),
        noise_dim=4,
        head_layers=1,
    )
    return export_bundle(CALM(config), tokenizer_path, root / "out", name, version)
