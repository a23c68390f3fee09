"""Cost arithmetic: FLOPs of a request against torch's FLOP counter on a real generation, and the
dollar arithmetic (node price, idle time, node share, counterfactual) on exact numbers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.ar import ARModel
from model.calm import CALM
from model.chunking import num_left_pads
from model.config import AutoencoderConfig, BackboneConfig, CALMConfig
from model.flops import ar_request_flops, baseline_of, calm_request_flops
from model.generate import generate
from model.tokenizer import BOS_ID
from operators.cost import batch_cost, dollars, per_1k

BACKBONE = BackboneConfig(
    vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=160, max_seq_len=128
)
CALM_CONFIG = CALMConfig(
    backbone=BACKBONE,
    autoencoder=AutoencoderConfig(vocab_size=512, d_model=64, d_ff=160, latent_dim=32),
)
PROMPT = [BOS_ID] + list(range(10, 31))  # 22 tokens: 2 left pads to 6 chunks of K=4
# FlopCounterMode counts every matrix product; the analytic count leaves out nothing it counts
# (norms and activations are not matrix products), so the two agree closely.
TOLERANCE = 0.01


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.mark.parametrize("new_tokens", [4, 17, 40])
def test_calm_request_flops_match_the_flop_counter(new_tokens):
    model = CALM(CALM_CONFIG).eval()
    out = {}
    measured = counted(
        lambda: out.setdefault("g", generate(model, [PROMPT], new_tokens, temperature=1.0))
    )
    steps, draws = out["g"].steps[0], out["g"].draws[0]
    chunks = (len(PROMPT) + num_left_pads(len(PROMPT), CALM_CONFIG.k)) // CALM_CONFIG.k
    analytic = calm_request_flops(CALM_CONFIG, chunks, steps, draws)
    assert abs(measured / analytic - 1) < TOLERANCE, (measured, analytic)


@pytest.mark.parametrize("new_tokens", [1, 9, 30])
def test_discrete_counterfactual_flops_match_the_flop_counter(new_tokens):
    baseline = baseline_of(CALM_CONFIG)
    model = ARModel(baseline).eval()
    out = {}
    measured = counted(
        lambda: out.setdefault("g", generate(model, [PROMPT], new_tokens, temperature=1.0))
    )
    produced = len(out["g"].tokens[0])
    assert abs(measured / ar_request_flops(baseline, len(PROMPT), produced) - 1) < TOLERANCE


def test_calm_spends_less_than_its_discrete_counterfactual_per_token():
    tokens = 96
    calm = calm_request_flops(CALM_CONFIG, 20, tokens // CALM_CONFIG.k, tokens // CALM_CONFIG.k)
    assert calm < ar_request_flops(baseline_of(CALM_CONFIG), 80, tokens)


def test_dollars_count_the_wall_clock_the_node_was_held():
    assert dollars(3.6, 3600) == pytest.approx(3.6)
    assert dollars(3.6, 10, node_share=0.5) == pytest.approx(0.005)
    busy_only = batch_cost(
        1e9, 3e9, wall_seconds=2.0, output_tokens=500, steps=125, price_per_hour=3.6
    )
    with_idle = batch_cost(
        1e9, 3e9, wall_seconds=10.0, output_tokens=500, steps=125, price_per_hour=3.6
    )
    assert busy_only.dollars == pytest.approx(0.002)
    assert with_idle.dollars == pytest.approx(0.010)  # idle seconds are paid too
    assert with_idle.dollars_per_1k_tokens == pytest.approx(0.020)
    assert with_idle.dollars_per_step == pytest.approx(0.010 / 125)
    assert with_idle.baseline_dollars == pytest.approx(0.030)  # 3x the FLOPs on the same node
    assert with_idle.baseline_dollars_per_1k_tokens == pytest.approx(0.060)


def test_a_batch_without_output_has_no_price_per_token():
    cost = batch_cost(0.0, 0.0, wall_seconds=1.0, output_tokens=0, steps=0, price_per_hour=1.0)
    assert cost.dollars > 0
    assert cost.dollars_per_1k_tokens is None and cost.dollars_per_step is None
    assert per_1k(1.0, 0) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"price_per_hour": -1, "seconds": 1},
        {"price_per_hour": 1, "seconds": -1},
        {"price_per_hour": 1, "seconds": 1, "node_share": 0},
        {"price_per_hour": 1, "seconds": 1, "node_share": 1.5},
    ],
)
def test_bad_cost_inputs_are_refused(bad):
    with pytest.raises(ValueError):
        dollars(**bad)
    with pytest.raises(ValueError, match="draws"):
        calm_request_flops(CALM_CONFIG, 4, steps=3, draws=2)
