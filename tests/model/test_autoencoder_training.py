"""A small autoencoder trained here on WikiText reconstructs held-out text, robustly to latent noise.

Tokenizer and autoencoder see only the training documents; accuracy is measured on chunks of
the 6 held-out documents. The paper's recipe (token dropout, latent dropout, clamped KL) at CPU
scale: vocab 512, d 128, latent 128, 450 steps of 256 chunks. Reached on the 2-core
reference box: 99.90 % clean, 99.86 % with sigma = 0.3 Gaussian noise on the latent mean.
"""

import numpy as np
import pytest
import torch

from model.autoencoder import Autoencoder, reconstruction_accuracy
from model.config import AutoencoderConfig
from model.data import chunk_batches, sample_chunks, wikitext_streams
from model.train_loops import fit

pytestmark = pytest.mark.slow


def test_autoencoder_reconstructs_heldout_text() -> None:
    torch.set_num_threads(1)
    _, train, heldout = wikitext_streams(vocab_size=512, n_heldout=6)
    config = AutoencoderConfig(vocab_size=512)
    torch.manual_seed(0)
    model = Autoencoder(config)
    losses = fit(model, chunk_batches(train, 256, config.k, seed=0), steps=450, lr=3e-3, warmup=20)
    chunks = torch.as_tensor(sample_chunks(heldout, 20000, config.k, np.random.default_rng(1)))
    clean = reconstruction_accuracy(model, chunks)
    noisy = reconstruction_accuracy(model, chunks, sigma=0.3)
    print(f"held-out reconstruction {clean:.4%}, with sigma=0.3 latent noise {noisy:.4%}")
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    assert clean >= 0.995, clean
    assert noisy > 0.99, noisy
