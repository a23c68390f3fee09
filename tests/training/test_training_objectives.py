"""The recipe's training options: summary-only loss, document-aligned rows, the training-only
auxiliary head (model/objectives.py) and shrunk energy-loss targets."""

import numpy as np
import onnx
import pytest
import torch

from model.ar import ARModel
from model.autoencoder import Autoencoder
from model.calm import CALM
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import ARConfig, AutoencoderConfig, BackboneConfig, CALMConfig
from model.data import document_layout
from model.export import export_calm
from model.generate import generate
from model.objectives import CALMObjective
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID
from model.train_loops import make_optimizer, train_step
from pipeline.training.corpus import DocumentRows, RowSamples, TokenCorpus

torch.set_num_threads(1)
V, K = 120, 4
BACKBONE = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
AE = AutoencoderConfig(vocab_size=V, k=K, d_model=32, d_ff=64, latent_dim=16)
CALM_CONFIG = CALMConfig(backbone=BACKBONE, autoencoder=AE, head_layers=1, n_samples=4, m_targets=8)


class RecordingAutoencoder(Autoencoder):
    """The real autoencoder, remembering which chunks it was asked to encode (the loss targets)."""

    encoded: list[torch.Tensor]

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.encoded.append(ids.clone())
        return super().encode(ids)


def corpus(prompt_lengths: list[int], summary_lengths: list[int], seed: int = 0) -> TokenCorpus:
    """Documents `<bos> prompt summary <eos>` with random tokens, as the training job tokenizes them."""
    rng = np.random.default_rng(seed)
    docs, prompts = [], []
    for p, s in zip(prompt_lengths, summary_lengths):
        prompt = np.array([BOS_ID, *rng.integers(4, V, p)], dtype=np.int64)
        docs.append(np.concatenate([prompt, rng.integers(4, V, s), [EOS_ID]]).astype(np.int32))
        prompts.append(prompt)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    return TokenCorpus(np.concatenate(docs), offsets, prompts, [[] for _ in docs])


def test_document_layout_puts_every_summary_on_a_chunk_boundary() -> None:
    c = corpus([5, 9, 2, 7], [6, 3, 11, 4])
    ids, summary, starts = document_layout(c.stream, c.offsets, c.summary_starts, K)
    assert len(ids) % K == 0 and np.all(starts % K == 0)
    for i in range(c.documents):
        doc = c.document(i)
        at = starts[i] + (-len(c.prompts[i]) % K)  # left pads, as a prompt is padded at inference
        assert np.all(ids[starts[i] : at] == PAD_ID)
        assert np.array_equal(ids[at : at + len(doc)], doc)
        first_summary = at + len(c.prompts[i])
        assert first_summary % K == 0  # the first generated chunk is a whole summary chunk
        assert not summary[starts[i] : first_summary].any()
        assert summary[first_summary : at + len(doc)].all()  # the summary and its <eos>
        end = starts[i + 1] if i + 1 < c.documents else len(ids)
        assert np.all(ids[at + len(doc) : end] == PAD_ID) and not summary[at + len(doc) : end].any()


def test_packed_documents_mask_each_documents_prompt() -> None:
    c = corpus([5, 9, 2, 7, 3], [6, 3, 11, 4, 5])
    rows = DocumentRows(c, row_len=48, k=K, summary_only=True)
    ids, targets = rows.batch(np.array([0, 1]), epoch=0)
    assert ids.shape == targets.shape == (2, 48)
    for row, mask in zip(ids, targets):
        assert row[0] in (PAD_ID, BOS_ID)  # a row starts at a document, never mid-prompt
        bos = np.flatnonzero(row == BOS_ID)
        assert len(bos) >= 2  # several documents packed in one row
        for start in bos:  # every document's prompt is read, never learned
            prompt = next(p for p in c.prompts if np.array_equal(row[start : start + len(p)], p))
            assert not mask[start : start + len(prompt)].any()
            assert mask[start + len(prompt)]  # its summary is
    # the stream rows cut the same per-token mask as their tokens
    stream_rows = RowSamples(c.stream, row_len=16, k=K, seed=0, targets=c.summary_mask)
    ids, targets = stream_rows.batch(np.arange(len(stream_rows)), epoch=0)
    assert not targets[ids == PAD_ID].any() and not targets[ids == BOS_ID].any()


def test_summary_only_loss_reads_prompt_chunks_but_never_targets_them() -> None:
    torch.manual_seed(0)
    autoencoder = RecordingAutoencoder(AE)
    calm = CALM(CALM_CONFIG, autoencoder).eval()
    c = corpus([7, 10], [9, 6])
    ids, targets = DocumentRows(c, row_len=40, k=K, summary_only=True).batch(np.array([0]), 0)
    ids_t, targets_t = torch.from_numpy(ids), torch.from_numpy(targets)
    changed = ids_t.clone()
    changed[0, 4:8] = torch.randint(4, V, (4,))  # a whole prompt chunk of the first document
    assert not targets_t[0, 4:8].any()

    def run(rows: torch.Tensor):
        autoencoder.encoded = []
        out = calm(rows, targets_t, generator=torch.Generator().manual_seed(1))
        return out, autoencoder.encoded[0]

    out, encoded = run(ids_t)
    out_changed, encoded_changed = run(changed)
    chunks = ids_t.view(1, -1, K)[:, 1:]
    assert torch.equal(out.scored, targets_t.view(1, -1, K)[:, 1:].any(-1))
    assert torch.equal(encoded, chunks[out.scored])  # the targets are the summary chunks only
    assert torch.equal(encoded_changed, encoded)  # a prompt's tokens are no target term
    # ... but the prompt is read: the states that predict the summary's chunks depend on it
    assert not torch.allclose(out_changed.hidden[out.scored], out.hidden[out.scored])


def test_ar_summary_only_loss_is_the_mean_over_summary_tokens() -> None:
    torch.manual_seed(0)
    ar = ARModel(ARConfig(backbone=BACKBONE)).eval()
    c = corpus([5, 8], [7, 4])
    ids, targets = DocumentRows(c, row_len=40, k=1, summary_only=True).batch(np.array([0, 1]), 0)
    ids_t, targets_t = torch.from_numpy(ids), torch.from_numpy(targets)
    out = ar(ids_t, targets_t)
    per_token = torch.nn.functional.cross_entropy(
        out.logits.flatten(0, 1), ids_t[:, 1:].flatten(), reduction="none"
    )
    expected = per_token[targets_t[:, 1:].flatten()].mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_target_scale_zero_trains_on_the_posterior_mean() -> None:
    torch.manual_seed(0)
    calm = CALM(CALM_CONFIG).eval()
    row = torch.randint(4, V, (2, 24))
    zero = [
        calm(row, target_scale=0.0, generator=torch.Generator().manual_seed(s)).loss.item()
        for s in (1, 2)
    ]
    full = [
        calm(row, target_scale=1.0, generator=torch.Generator().manual_seed(s)).loss.item()
        for s in (1, 2)
    ]
    # with the same head noise, mean targets remove the targets' own spread from the score
    assert zero[0] < full[0] and zero[1] < full[1]


def test_auxiliary_head_trains_and_never_leaves_the_objective(tmp_path) -> None:
    torch.manual_seed(0)
    calm = CALM(CALM_CONFIG)
    objective = CALMObjective(calm, aux_weight=1.0)
    before = objective.aux_head.weight.detach().clone()
    optimizer = make_optimizer(objective, lr=3e-3)
    c = corpus([6, 5, 9, 4], [8, 7, 5, 6])
    rows = DocumentRows(c, row_len=40, k=K, summary_only=True)
    first = objective(*map(torch.from_numpy, rows.batch(np.arange(4), 0))).auxiliary.item()
    for step in range(40):
        train_step(objective, optimizer, rows.batch(np.arange(4), 0))
    last = objective(*map(torch.from_numpy, rows.batch(np.arange(4), 0))).auxiliary.item()
    assert not torch.equal(objective.aux_head.weight, before) and last < first

    save_checkpoint(calm, tmp_path / "ckpt")
    reloaded = load_checkpoint(tmp_path / "ckpt")
    assert set(reloaded.state_dict()) == set(CALM(CALM_CONFIG).state_dict())  # no aux weights
    graphs = export_calm(reloaded, tmp_path / "onnx")
    aux_shape = list(objective.aux_head.weight.shape)
    for path in graphs.values():
        for initializer in onnx.load(str(path)).graph.initializer:
            assert list(initializer.dims) != aux_shape and list(initializer.dims) != aux_shape[::-1]
    prompts = [[BOS_ID, 5, 6, 7], [BOS_ID, 9]]
    trained = generate(calm.eval(), prompts, 12, seeds=[3, 4], temperature=0.5)
    exported = generate(reloaded, prompts, 12, seeds=[3, 4], temperature=0.5)
    assert trained.tokens == exported.tokens
