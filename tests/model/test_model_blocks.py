"""The model library's blocks: shapes, masks, causality, generation, FLOPs, checkpoints, memory."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from model import flops
from model.ar import ARModel
from model.autoencoder import Autoencoder
from model.backbone import Backbone, attention_bias, positions_from_mask
from model.bench import energy_memory, naive_energy_loss
from model.calm import CALM, EnergyHead, energy_loss
from model.checkpoint import build_model, load_checkpoint, save_checkpoint
from model.config import (
    ARConfig,
    AutoencoderConfig,
    BackboneConfig,
    CALMConfig,
    load_config,
    save_config,
)
from model.data import pack_rows
from model.evaluate import ar_probability, evaluate_model
from model.generate import generate, pad_prompts
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID

torch.set_num_threads(1)
V, K = 300, 4
BACKBONE = BackboneConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
AE = AutoencoderConfig(vocab_size=V, k=K, d_model=32, d_ff=64, latent_dim=16)
CALM_CONFIG = CALMConfig(
    backbone=BACKBONE, autoencoder=AE, head_layers=2, n_samples=4, m_targets=10
)
AR_CONFIG = ARConfig(backbone=BACKBONE)
PROMPTS = [[BOS_ID, 5, 6], [BOS_ID, 7, 8, 9, 10, 11, 12, 13, 14], [BOS_ID], [BOS_ID, 20, 21, 22]]


@pytest.fixture(scope="module")
def calm() -> CALM:
    torch.manual_seed(0)
    model = CALM(CALM_CONFIG)
    torch.nn.init.normal_(model.head.out[-1].weight, std=0.5)  # zero-init would decode one chunk
    return model.eval()


@pytest.fixture(scope="module")
def ar() -> ARModel:
    torch.manual_seed(0)
    return ARModel(AR_CONFIG).eval()


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, V, shape, generator=torch.Generator().manual_seed(seed))


# --- shapes -------------------------------------------------------------------------------------


def test_autoencoder_shapes() -> None:
    ae = Autoencoder(AE)
    mean, log_std = ae.encode(ids(5, 3, K))
    assert mean.shape == log_std.shape == (5, 3, AE.latent_dim)
    assert ae.decode(mean).shape == (5, 3, K, V)
    out = ae(ids(7, K))
    assert out.logits.shape == (7, K, V) and out.loss.ndim == 0
    assert out.kl >= AE.kl_clamp * AE.latent_dim - 1e-6  # clamped from below, per dimension
    with pytest.raises(ValueError, match="chunks of k"):
        ae.encode(ids(2, K + 1))


def test_autoencoder_output_projection_is_tied() -> None:
    ae = Autoencoder(AE)
    names = [n for n, _ in ae.named_parameters()]
    assert sum("wte" in n for n in names) == 1
    with torch.no_grad():
        ae.wte.weight[7].zero_()
    assert torch.all(ae.decode(torch.randn(3, AE.latent_dim))[..., 7] == 0)


def test_energy_head_shapes_and_zero_init() -> None:
    head = EnergyHead(d=32, latent_dim=16, noise_dim=64, n_blocks=2)
    out = head(torch.randn(3, 5, 32), torch.rand(3, 5, 8, 64) - 0.5)
    assert out.shape == (3, 5, 8, 16)
    model = CALM(CALM_CONFIG)
    assert torch.all(model.head.out[-1].weight == 0) and torch.all(model.head.out[-1].bias == 0)


def test_calm_and_ar_forward_shapes(calm: CALM, ar: ARModel) -> None:
    out = calm(ids(2, 6 * K))
    assert out.loss.ndim == 0 and out.hidden.shape == (2, 5, BACKBONE.d_model)
    out = ar(ids(2, 10))
    assert out.logits.shape == (2, 9, V)
    with pytest.raises(ValueError, match="multiple of k"):
        calm(ids(2, 6 * K + 1))


def test_calm_autoencoder_is_frozen(calm: CALM) -> None:
    assert not any(p.requires_grad for p in calm.autoencoder.parameters())
    calm.train()
    assert not calm.autoencoder.training
    calm.eval()


# --- masks and causality ------------------------------------------------------------------------


def test_attention_bias_is_causal_and_hides_pads() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    bias = attention_bias(mask, q_len=4)[:, 0]
    assert bias.shape == (2, 4, 4)
    assert torch.equal(bias[1], torch.ones(4, 4, dtype=torch.bool).tril())
    assert not bias[0, 2:, :2].any()  # real positions never see the pads
    assert bias[0, 0, 0] and bias[0, 1, 1]  # a pad sees itself only (keeps it finite)
    # the last query of a cached step
    assert torch.equal(
        attention_bias(mask, q_len=1)[0, 0, 0], torch.tensor([False, False, True, True])
    )
    assert torch.equal(positions_from_mask(mask), torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3]]))


def test_backbone_causality() -> None:
    torch.manual_seed(0)
    backbone = Backbone(BACKBONE).eval()
    x = torch.randn(2, 10, BACKBONE.d_model)
    changed = x.clone()
    changed[:, 6:] = torch.randn(2, 4, BACKBONE.d_model)
    a, _ = backbone(x)
    b, _ = backbone(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_calm_causality(calm: CALM) -> None:
    rows = ids(2, 8 * K)
    changed = rows.clone()
    changed[:, 5 * K + 1] = 7  # a token of chunk 5 = input of position 5
    a = calm(rows).hidden
    b = calm(changed).hidden
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert not torch.allclose(a[:, 5], b[:, 5])


def test_ar_causality(ar: ARModel) -> None:
    rows = ids(2, 12)
    changed = rows.clone()
    changed[:, 7] = 9
    a, b = ar(rows).logits, ar(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)


def test_pads_are_never_attended(ar: ARModel) -> None:
    """A left-padded row's hidden states do not depend on what sits in its masked positions."""
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    x = ar.backbone.wte(torch.tensor([[PAD_ID] * 3 + [BOS_ID, 5, 6, 7]]))
    other = x.clone()
    other[:, :3] = torch.randn(1, 3, BACKBONE.d_model) * 10
    a, _ = ar.backbone(x, attention_mask=mask)
    b, _ = ar.backbone(other, attention_mask=mask)
    unpadded, _ = ar.backbone(x[:, 3:])
    torch.testing.assert_close(a[:, 3:], b[:, 3:], rtol=0, atol=0)
    torch.testing.assert_close(a[:, 3:], unpadded, rtol=1e-5, atol=1e-5)


def test_kv_cache_matches_full_forward(ar: ARModel) -> None:
    x = ar.backbone.wte(ids(2, 9))
    full, _ = ar.backbone(x)
    first, cache = ar.backbone(x[:, :5])
    rest = []
    for t in range(5, 9):
        h, cache = ar.backbone(x[:, t : t + 1], past_key_values=cache)
        rest.append(h)
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, rtol=1e-5, atol=1e-5)


# --- packing and prompt alignment ---------------------------------------------------------------


def test_pack_rows_left_pads_then_bos() -> None:
    stream = np.concatenate([[BOS_ID, *range(10, 60), EOS_ID]] * 20)
    rows = pack_rows(stream, 200, 8 * K, K, np.random.default_rng(0))
    pads = (rows == PAD_ID).sum(axis=1)
    assert set(pads.tolist()) == set(range(K))  # every offset 0..K-1 occurs
    for row, r in zip(rows, pads):
        assert (row[:r] == PAD_ID).all() and row[r] == BOS_ID and row[r + 1] != BOS_ID
    assert (
        pack_rows(stream, 50, 8 * K, K, np.random.default_rng(0), left_pads=0)[:, 0] == BOS_ID
    ).all()


def test_pad_prompts_aligns_each_prompt_to_k() -> None:
    chunks, mask = pad_prompts(PROMPTS, K)
    assert chunks.shape == (4, 3, K) and mask.shape == (4, 3)
    assert chunks[0, -1].tolist() == [PAD_ID, BOS_ID, 5, 6] and mask[0].tolist() == [
        False,
        False,
        True,
    ]
    assert chunks[1].flatten().tolist() == [PAD_ID] * 3 + PROMPTS[1] and mask[1].all()
    assert chunks[2, -1].tolist() == [PAD_ID] * 3 + [BOS_ID]


# --- generation ---------------------------------------------------------------------------------

GENERATION_CASES = [
    ("calm", 1.0, "adaptive"),
    ("calm", 0.5, "adaptive"),
    ("calm", 0.5, "approximate"),
    ("ar", 1.0, "adaptive"),
    ("ar", 0.7, "adaptive"),
]


@pytest.mark.parametrize("name,temperature,sampler", GENERATION_CASES)
def test_kv_cache_generation_equals_no_cache(request, name, temperature, sampler) -> None:
    model = request.getfixturevalue(name)
    kw = {
        "seeds": [11, 12, 13, 14],
        "temperature": temperature,
        "sampler": sampler,
        "n_candidates": 32,
    }
    cached = generate(model, PROMPTS, 9, use_cache=True, **kw)
    uncached = generate(model, PROMPTS, 9, use_cache=False, **kw)
    assert cached.tokens == uncached.tokens
    assert len({tuple(t) for t in cached.tokens}) > 1  # not a degenerate model


@pytest.mark.parametrize("name,temperature,sampler", GENERATION_CASES)
def test_ragged_batch_equals_one_by_one(request, name, temperature, sampler) -> None:
    model = request.getfixturevalue(name)
    seeds = [21, 22, 23, 24]
    kw = {"temperature": temperature, "sampler": sampler, "n_candidates": 32}
    batch = generate(model, PROMPTS, 10, seeds=seeds, **kw)
    alone = [generate(model, [p], 10, seeds=[s], **kw).tokens[0] for p, s in zip(PROMPTS, seeds)]
    assert batch.tokens == alone
    reordered = generate(model, PROMPTS[::-1], 10, seeds=seeds[::-1], **kw)
    assert reordered.tokens[::-1] == batch.tokens


@pytest.mark.parametrize("name", ["calm", "ar"])
def test_seeds_reproduce_and_differ(request, name) -> None:
    model = request.getfixturevalue(name)
    a = generate(model, PROMPTS, 8, seeds=[1, 2, 3, 4]).tokens
    assert generate(model, PROMPTS, 8, seeds=[1, 2, 3, 4]).tokens == a
    assert generate(model, PROMPTS, 8, seeds=[5, 6, 7, 8]).tokens != a


@pytest.mark.parametrize("name", ["calm", "ar"])
def test_never_overshoots_the_token_limit(request, name) -> None:
    model = request.getfixturevalue(name)
    limits = [1, 5, 7, 0]  # not multiples of K
    out = generate(model, PROMPTS, limits, stop_on_eos=False)
    assert [len(t) for t in out.tokens] == limits
    assert out.steps == [-(-n // model.config.k) for n in limits]
    assert set(out.finish_reasons) == {"length"}


def eos_at_chunk_position(model: CALM | ARModel, position: int) -> None:
    """Weight surgery: make every generated chunk carry <eos> at `position`."""
    with torch.no_grad():
        if isinstance(model, CALM):  # the decoder's position `position` points at <eos>'s row
            ae, d = model.autoencoder, AE.d_model
            ae.wte.weight[:, 0] = 0
            ae.wte.weight[EOS_ID, 0] = 50
            ae.expand.bias[position * d] = 1000
        else:  # a constant offset in the residual stream that only <eos>'s logit reads
            model.backbone.wte.weight[:, 0] = 100
            model.lm_head.weight[:, 0] = 0
            model.lm_head.weight[EOS_ID, 0] = 10


def test_stops_on_eos() -> None:
    torch.manual_seed(0)
    calm = CALM(CALM_CONFIG).eval()
    eos_at_chunk_position(calm, 2)
    out = generate(calm, PROMPTS, 20)
    assert all(len(t) == 2 for t in out.tokens) and set(out.finish_reasons) == {"eos"}
    assert all(EOS_ID not in t for t in out.tokens) and out.steps == [1] * 4
    full = generate(calm, PROMPTS, 6, stop_on_eos=False)
    assert all(t[2] == EOS_ID and len(t) == 6 for t in full.tokens)
    assert generate(calm, PROMPTS, 2).finish_reasons == ["length"] * 4  # <eos> past the limit

    ar = ARModel(AR_CONFIG).eval()
    eos_at_chunk_position(ar, 0)
    out = generate(ar, PROMPTS, 20)
    assert out.tokens == [[]] * 4 and set(out.finish_reasons) == {"eos"}


def test_generation_rejects_bad_input(calm: CALM) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        generate(calm, [[]], 4)
    with pytest.raises(ValueError, match="temperature"):
        generate(calm, PROMPTS, 4, temperature=1.5)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(calm, [[BOS_ID] * (K * 60)], 40)
    with pytest.raises(ValueError, match="seeds"):
        generate(calm, PROMPTS, 4, seeds=[1])


# --- FLOPs --------------------------------------------------------------------------------------


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def backward(model, batch) -> None:
    model.train()
    model(batch).loss.backward()
    model.zero_grad()


FLOPS_BACKBONE = BackboneConfig(
    vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=160, max_seq_len=128
)
FLOPS_AE = AutoencoderConfig(vocab_size=512, d_model=64, d_ff=160, latent_dim=32)
FLOPS_CALM = CALMConfig(backbone=FLOPS_BACKBONE, autoencoder=FLOPS_AE, n_samples=8, m_targets=100)
FLOPS_AR = ARConfig(backbone=FLOPS_BACKBONE)


@pytest.mark.parametrize("config", [FLOPS_AE, FLOPS_CALM, FLOPS_AR], ids=["ae", "calm", "ar"])
def test_training_flops_within_10_percent(config) -> None:
    torch.manual_seed(0)
    model = build_model(config)
    if isinstance(config, AutoencoderConfig):
        batch, tokens, positions = ids(64, K), 64 * K, 0
    elif isinstance(config, CALMConfig):
        batch, tokens, positions = ids(2, 16 * K), 2 * 15 * K, 15  # 15 predicted chunks per row
    else:
        batch, tokens, positions = ids(2, 65), 2 * 64, 64
    measured = counted(lambda: backward(model, batch))
    analytic = flops.training_flops_per_token(config, positions) * tokens
    assert abs(measured / analytic - 1) < 0.10, (measured, analytic)


def sampling_flops(config: CALMConfig | ARConfig) -> float:
    """FLOPs that turn one hidden state into one chunk (CALM head + decoder, AR LM head)."""
    if isinstance(config, CALMConfig):
        return flops.head_forward(config, 1) + flops.ae_decoder_forward(config.autoencoder)
    return flops.linear(config.backbone.d_model, config.backbone.vocab_size)


@pytest.mark.parametrize("config", [FLOPS_CALM, FLOPS_AR], ids=["calm", "ar"])
def test_inference_flops_within_10_percent(config) -> None:
    """A whole generate() call: prefill of P positions (dense attention over the prompt, no
    sampling but at the last position), then S - 1 cached steps at contexts P+1 .. P+S-1."""
    torch.manual_seed(0)
    model = build_model(config).eval()
    k, positions, steps = config.k, 6, 5
    prompt = [BOS_ID] + list(range(10, 9 + positions * k))

    def step(context: int) -> float:  # one generative step = k tokens
        return flops.inference_flops_per_token(config, context) * k

    measured = counted(lambda: generate(model, [prompt], steps * k))
    analytic = positions * (step(positions) - sampling_flops(config)) + sampling_flops(config)
    analytic += sum(step(positions + i) for i in range(1, steps))
    assert abs(measured / analytic - 1) < 0.10, (measured, analytic)


# --- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [AE, CALM_CONFIG, AR_CONFIG], ids=["ae", "calm", "ar"])
def test_checkpoint_round_trip(config, tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model(config)
    save_checkpoint(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert load_config(tmp_path / "config.json") == config
    loaded = load_checkpoint(tmp_path)
    original = model.state_dict()
    assert original.keys() == loaded.state_dict().keys()
    assert all(torch.equal(original[k], v) for k, v in loaded.state_dict().items())


def test_checkpoint_strict_keys(tmp_path) -> None:
    model = ARModel(AR_CONFIG)
    save_config(AR_CONFIG, tmp_path / "config.json")
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="lm_head"):
        load_checkpoint(tmp_path)


# --- energy loss --------------------------------------------------------------------------------


def test_energy_loss_equals_naive_form() -> None:
    torch.manual_seed(0)
    samples = torch.randn(50, 8, 16, requires_grad=True)
    mean, log_std = torch.randn(50, 16), torch.randn(50, 16) * 0.3
    ours = energy_loss(samples, mean, log_std, 100, torch.Generator().manual_seed(3))
    naive = naive_energy_loss(samples, mean, log_std, 100, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, naive, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.sum(), samples)
    (g_naive,) = torch.autograd.grad(naive.sum(), samples)
    torch.testing.assert_close(g_ours, g_naive, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(g_ours).all()  # the zero diagonal of the sample-sample distances


def test_energy_loss_peak_memory_below_naive() -> None:
    """Each form's forward + backward in a fresh process: the naive form holds the
    [P, N, M, D] difference tensor (100 MiB here), ours only distance matrices and targets."""
    report = energy_memory(positions=256, n=8, m=100, latent=128)
    peaks = report["peak_rss_growth_mib"]
    assert peaks["naive"] > report["tensor_mib"]["differences_PNMD_naive_only"]
    assert peaks["ours"] * 4 < peaks["naive"], report


# --- greedy decoding and BrierLM wiring ---------------------------------------------------------


def test_ar_greedy_generation_follows_argmax(ar: ARModel) -> None:
    prompt = PROMPTS[1]
    out = generate(ar, [prompt], 6, temperature=0.0).tokens[0]
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(ar(torch.tensor([seq + [0]])).logits[0, -1].argmax()))
    assert out == seq[len(prompt) :]


def test_ar_probability_matches_forward(ar: ARModel) -> None:
    prefixes = [np.array(p) for p in PROMPTS]
    continuations = ids(4, 4, seed=3).numpy()
    got = ar_probability(ar, context_tokens=64)(prefixes, continuations)
    for b, (p, c) in enumerate(zip(PROMPTS, continuations)):
        logp = torch.log_softmax(ar(torch.tensor([p + c.tolist()])).logits[0], -1)
        token_logp = logp[len(p) - 1 + torch.arange(4), torch.as_tensor(c)]
        np.testing.assert_allclose(got[b], token_logp.cumsum(0).exp().detach().numpy(), rtol=1e-4)


@pytest.mark.parametrize("k", [2, 4])
def test_brierlm_runs_for_calm_and_ar(k: int, ar: ARModel) -> None:
    torch.manual_seed(0)
    config = CALMConfig(
        backbone=BACKBONE,
        autoencoder=AutoencoderConfig(vocab_size=V, k=k, d_model=32, d_ff=64, latent_dim=16),
        head_layers=2,
    )
    calm = CALM(config).eval()
    docs = [np.array([BOS_ID, *range(10, 40)]), np.array([BOS_ID, *range(50, 90)])]
    report = evaluate_model(calm, docs, context_tokens=16, batch_size=8).to_dict()
    assert set(report) == {"two_sample"} and report["two_sample"]["positions"] > 2
    report = evaluate_model(ar, docs, context_tokens=16, max_positions=20).to_dict()
    assert set(report) == {"two_sample", "probability", "rao_blackwell"}
    assert report["rao_blackwell"]["positions"] == 20
