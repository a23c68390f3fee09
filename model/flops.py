"""Analytic FLOPs per token for the autoencoder, CALM and the discrete AR baseline.

Counted as torch.utils.flop_counter.FlopCounterMode counts: 2 FLOPs per multiply-add of every
matrix product (linear layers, attention scores and values); norms, activations and the energy
loss's distance matrices are left out (a few percent at most). Training = forward + backward =
3 x forward for the trained parts; CALM's frozen encoder runs forward only.

Attention over `context` keys costs 4 * context * d_model per position and layer. Training uses
dense causal kernels that compute the whole seq_len x seq_len square, so its context is the row
length (positions, i.e. chunks for CALM); inference passes the actual context length.
"""

from model.config import ARConfig, AutoencoderConfig, BackboneConfig, CALMConfig


def linear(n_in: int, n_out: int) -> int:
    return 2 * n_in * n_out


def backbone_forward(c: BackboneConfig, context: float) -> float:
    """One position through all blocks, attending to `context` keys."""
    d = c.d_model
    per_layer = linear(d, 3 * d) + linear(d, d) + 4 * context * d + 3 * linear(d, c.d_ff)
    return c.n_layers * per_layer


def ae_encoder_forward(c: AutoencoderConfig) -> int:
    """One chunk of K tokens -> (mean, log-std)."""
    half, d = c.n_layers // 2, c.d_model
    mlp = 3 * linear(d, c.d_ff)
    return c.k * half * mlp + linear(c.k * d, d) + half * mlp + linear(d, 2 * c.latent_dim)


def ae_decoder_forward(c: AutoencoderConfig) -> int:
    """One latent -> K rows of logits (the tied vocabulary projection included)."""
    half, d = c.n_layers // 2, c.d_model
    mlp = 3 * linear(d, c.d_ff)
    return (
        linear(c.latent_dim, d)
        + half * mlp
        + linear(d, c.k * d)
        + c.k * half * mlp
        + c.k * linear(d, c.vocab_size)
    )


def head_forward(c: CALMConfig, samples: int) -> int:
    """Energy head for one position: the hidden projection once, then `samples` noise passes."""
    d = c.backbone.d_model
    block = linear(2 * d, d) + linear(d, d) + linear(d, 2 * d) + linear(d, d)
    per_sample = (
        linear(c.noise_dim, d)
        + c.head_layers * block
        + linear(d, d)
        + linear(d, c.autoencoder.latent_dim)
    )
    return linear(d, d) + samples * per_sample


def compress_forward(c: CALMConfig) -> int:
    d = c.backbone.d_model
    return linear(c.k * d, 2 * d) + linear(2 * d, d)


def training_flops_per_token(
    config: AutoencoderConfig | CALMConfig | ARConfig, seq_len: int = 0
) -> float:
    """Forward + backward FLOPs per training token; `seq_len` = positions per row (attention)."""
    if isinstance(config, AutoencoderConfig):
        return 3 * (ae_encoder_forward(config) + ae_decoder_forward(config)) / config.k
    if isinstance(config, CALMConfig):
        trained = compress_forward(config) + backbone_forward(config.backbone, seq_len)
        trained += head_forward(config, config.n_samples)
        return (3 * trained + ae_encoder_forward(config.autoencoder)) / config.k
    if isinstance(config, ARConfig):
        b = config.backbone
        return 3 * (backbone_forward(b, seq_len) + linear(b.d_model, b.vocab_size))
    raise TypeError(f"no FLOPs model for {type(config).__name__}")


def inference_flops_per_token(
    config: CALMConfig | ARConfig, context: float, samples: float = 1
) -> float:
    """FLOPs per generated token at `context` positions (CALM: chunks) of KV cache.

    CALM: one step = compress the last chunk + backbone + `samples` head passes and decodes
    (1 at T = 1; the sampler's mean draws per step otherwise; each draw runs the head on its own
    copy of the hidden state, as model/generate.py does), spread over its K tokens.
    """
    if isinstance(config, CALMConfig):
        step = compress_forward(config) + backbone_forward(config.backbone, context)
        step += samples * (head_forward(config, 1) + ae_decoder_forward(config.autoencoder))
        return step / config.k
    if isinstance(config, ARConfig):
        b = config.backbone
        return backbone_forward(b, context) + linear(b.d_model, b.vocab_size)
    raise TypeError(f"no FLOPs model for {type(config).__name__}")


# Whole requests, as the serving engine runs them (model/engine.py): the telemetry prices these.
# A request is a prefill over its prompt positions (attention computed densely over the whole
# prompt, masked), then one generative step per output position; every step but the last feeds
# its output back through the backbone at one more position of context.


def _prefill_and_feedback(position: float, per_context: float, prompt: int, steps: int) -> float:
    """Backbone FLOPs of a request: `position` per position plus `per_context` per key attended."""
    prefill = prompt * (position + per_context * prompt)
    fed_back = max(steps - 1, 0)  # the last output is never fed back
    first_key = prompt + 1
    decode = fed_back * position + per_context * fed_back * (2 * first_key + fed_back - 1) / 2
    return prefill + decode


def calm_request_flops(config: CALMConfig, prompt_chunks: int, steps: int, draws: int) -> float:
    """FLOPs of one CALM request: prefill over `prompt_chunks`, then `steps` generative steps
    that drew `draws` chunks in total (draws >= steps; equal at T = 1): each draw is one head
    and decoder pass, the head's hidden projection runs once per step."""
    if prompt_chunks < 1 or steps < 0 or draws < steps:
        raise ValueError(
            f"need prompt_chunks >= 1 and draws >= steps >= 0, got "
            f"{prompt_chunks}, {steps}, {draws}"
        )
    position = compress_forward(config) + backbone_forward(config.backbone, 0)
    per_context = backbone_forward(config.backbone, 1) - backbone_forward(config.backbone, 0)
    backbone = _prefill_and_feedback(position, per_context, prompt_chunks, steps)
    sample = head_forward(config, 1) - linear(config.backbone.d_model, config.backbone.d_model)
    hidden_projection = linear(config.backbone.d_model, config.backbone.d_model)
    heads = steps * hidden_projection + draws * (sample + ae_decoder_forward(config.autoencoder))
    return backbone + heads


def ar_request_flops(config: ARConfig, prompt_tokens: int, output_tokens: int) -> float:
    """FLOPs of the discrete baseline producing `output_tokens` after `prompt_tokens`."""
    if prompt_tokens < 1 or output_tokens < 0:
        raise ValueError(
            f"need prompt_tokens >= 1 and output_tokens >= 0, got {prompt_tokens}, {output_tokens}"
        )
    b = config.backbone
    position = backbone_forward(b, 0)
    per_context = backbone_forward(b, 1) - position
    backbone = _prefill_and_feedback(position, per_context, prompt_tokens, output_tokens)
    return backbone + output_tokens * linear(b.d_model, b.vocab_size)


def baseline_of(config: CALMConfig) -> ARConfig:
    """The discrete model a CALM is compared with: CALM's backbone with a token head (K = 1)."""
    return ARConfig(
        backbone=config.backbone, bos_id=config.bos_id, eos_id=config.eos_id, pad_id=config.pad_id
    )
