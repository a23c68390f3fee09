"""Cost arithmetic of one inference batch: analytic FLOPs, dollars, and the discrete counterfactual.

- FLOPs come from the per-position counts of `model.flops` (2 FLOPs per multiply-add of every
  matrix product), as the engine executes them. A CALM request is a prefill over its prompt
  chunks (attention computed densely over the whole prompt, masked), then one generative step per
  output chunk: `draws` head+decoder passes (1 at T = 1, the sampler's draws otherwise) and, for
  every step after the first, the compressor and the backbone on the chunk just produced.
- The counterfactual is the discrete baseline with the same backbone (K = 1, untied vocabulary
  head) producing the same output tokens from the same prompt: one step per token.
- Dollars: the node's price per hour times the wall-clock seconds the actor held it, idle time
  included (the seconds since its previous batch ended, not only the compute), times the share of
  the node the actor holds. The counterfactual dollars scale the measured dollars by the FLOPs
  ratio: the same hardware at the same efficiency, doing the discrete model's work.
"""

from dataclasses import dataclass

from model.config import ARConfig, CALMConfig
from model.flops import ae_decoder_forward, backbone_forward, compress_forward, head_forward, linear

SECONDS_PER_HOUR = 3600.0


def calm_request_flops(config: CALMConfig, prompt_chunks: int, steps: int, draws: int) -> float:
    """FLOPs of one CALM request: prefill over `prompt_chunks`, then `steps` generative steps
    that drew `draws` chunks in total (draws >= steps; equal at T = 1)."""
    if prompt_chunks < 1 or steps < 0 or draws < steps:
        raise ValueError(
            f"need prompt_chunks >= 1 and draws >= steps >= 0, got "
            f"{prompt_chunks}, {steps}, {draws}"
        )
    position = compress_forward(config) + backbone_forward(config.backbone, 0)
    per_context = backbone_forward(config.backbone, 1) - backbone_forward(config.backbone, 0)
    prefill = prompt_chunks * (position + per_context * prompt_chunks)
    fed_back = max(steps - 1, 0)  # the last chunk is never fed back
    first_key = prompt_chunks + 1
    decode = fed_back * position + per_context * fed_back * (2 * first_key + fed_back - 1) / 2
    sample = head_forward(config, 1) - linear(config.backbone.d_model, config.backbone.d_model)
    hidden_projection = linear(config.backbone.d_model, config.backbone.d_model)
    heads = steps * hidden_projection + draws * (sample + ae_decoder_forward(config.autoencoder))
    return prefill + decode + heads


def ar_request_flops(config: ARConfig, prompt_tokens: int, output_tokens: int) -> float:
    """FLOPs of the discrete baseline producing `output_tokens` after `prompt_tokens`."""
    if prompt_tokens < 1 or output_tokens < 0:
        raise ValueError(
            f"need prompt_tokens >= 1 and output_tokens >= 0, got {prompt_tokens}, {output_tokens}"
        )
    b = config.backbone
    position = backbone_forward(b, 0)
    per_context = backbone_forward(b, 1) - position
    prefill = prompt_tokens * (position + per_context * prompt_tokens)
    fed_back = max(output_tokens - 1, 0)
    first_key = prompt_tokens + 1
    decode = fed_back * position + per_context * fed_back * (2 * first_key + fed_back - 1) / 2
    return prefill + decode + output_tokens * linear(b.d_model, b.vocab_size)


def baseline_of(config: CALMConfig) -> ARConfig:
    """The discrete model the counterfactual prices: CALM's backbone with a token head."""
    return ARConfig(
        backbone=config.backbone, bos_id=config.bos_id, eos_id=config.eos_id, pad_id=config.pad_id
    )


def dollars(price_per_hour: float, seconds: float, node_share: float = 1.0) -> float:
    """What `seconds` of `node_share` of a node priced `price_per_hour` cost."""
    if price_per_hour < 0 or seconds < 0 or not 0 < node_share <= 1:
        raise ValueError("need price_per_hour >= 0, seconds >= 0 and 0 < node_share <= 1")
    return price_per_hour * node_share * seconds / SECONDS_PER_HOUR


def per_1k(amount: float, tokens: int) -> float | None:
    """`amount` per 1000 tokens; None when nothing was produced (a pass-through batch)."""
    return None if tokens <= 0 else 1000.0 * amount / tokens


@dataclass(frozen=True)
class BatchCost:
    """The cost columns of one telemetry row."""

    flops: float
    dollars: float
    dollars_per_1k_tokens: float | None
    dollars_per_step: float | None
    baseline_flops: float
    baseline_dollars: float
    baseline_dollars_per_1k_tokens: float | None


def batch_cost(
    flops: float,
    baseline_flops: float,
    wall_seconds: float,
    output_tokens: int,
    steps: int,
    price_per_hour: float,
    node_share: float = 1.0,
) -> BatchCost:
    """Cost of a batch that held the actor `wall_seconds` (idle time since the last batch
    included) and produced `output_tokens` in `steps` generative steps."""
    spent = dollars(price_per_hour, wall_seconds, node_share)
    baseline = spent * baseline_flops / flops if flops > 0 else 0.0
    return BatchCost(
        flops=flops,
        dollars=spent,
        dollars_per_1k_tokens=per_1k(spent, output_tokens),
        dollars_per_step=spent / steps if steps > 0 else None,
        baseline_flops=baseline_flops,
        baseline_dollars=baseline,
        baseline_dollars_per_1k_tokens=per_1k(baseline, output_tokens),
    )
