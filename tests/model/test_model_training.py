"""A tiny CALM and a tiny AR baseline learn from WikiText in a few hundred steps.

Validation rows come from held-out documents and are scored with fixed noise. The AR baseline
must also beat the held-out cross-entropy of the training unigram distribution. CALM's first
hundreds of steps mostly teach the energy head the chunk distribution (its loss falls about 30 %);
using the context to beat the chunk marginal takes it about 800 steps at this size, too long for a
test (model/bench.py's alignment run trains longer).
"""

import numpy as np
import pytest
import torch

from model.ar import ARModel
from model.autoencoder import Autoencoder
from model.calm import CALM
from model.config import ARConfig, AutoencoderConfig, BackboneConfig, CALMConfig
from model.data import chunk_batches, pack_rows, row_batches, wikitext_streams
from model.train_loops import evaluate_loss, fit

pytestmark = pytest.mark.slow
V, ROW_LEN = 512, 64
BACKBONE = BackboneConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=2, d_ff=176, max_seq_len=64)


@pytest.fixture(scope="module")
def streams() -> tuple[np.ndarray, np.ndarray]:
    torch.set_num_threads(1)
    _, train, heldout = wikitext_streams(V)
    return train, heldout


def validation_rows(heldout: np.ndarray, k: int) -> list[np.ndarray]:
    return np.array_split(pack_rows(heldout, 128, ROW_LEN, k, np.random.default_rng(1)), 4)


def test_ar_validation_loss_falls(streams) -> None:
    train, heldout = streams
    torch.manual_seed(0)
    model = ARModel(ARConfig(backbone=BACKBONE))
    rows = validation_rows(heldout, 1)
    before = evaluate_loss(model, rows)
    fit(model, row_batches(train, 16, ROW_LEN, 1, seed=0), steps=200, lr=2e-3, warmup=20)
    after = evaluate_loss(model, rows)
    counts = np.bincount(train, minlength=V) + 1
    unigram = -np.log(counts / counts.sum())[np.concatenate(rows)[:, 1:]].mean()
    print(f"AR validation cross-entropy {before:.3f} -> {after:.3f} (unigram {unigram:.3f})")
    assert after < unigram < before


def test_calm_validation_loss_falls(streams) -> None:
    train, heldout = streams
    torch.manual_seed(0)
    autoencoder = Autoencoder(AutoencoderConfig(vocab_size=V, d_model=64, d_ff=160, latent_dim=64))
    fit(autoencoder, chunk_batches(train, 256, 4, seed=0), steps=100, lr=3e-3, warmup=20)
    config = CALMConfig(backbone=BACKBONE, autoencoder=autoencoder.config, head_layers=2)
    model = CALM(config, autoencoder)
    rows = validation_rows(heldout, config.k)
    before = evaluate_loss(model, rows)
    fit(model, row_batches(train, 16, ROW_LEN, config.k, seed=0), steps=200, lr=2e-3, warmup=20)
    after = evaluate_loss(model, rows)
    print(f"CALM validation energy loss {before:.3f} -> {after:.3f}")
    assert after < 0.9 * before
