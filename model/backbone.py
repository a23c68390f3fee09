"""Llama-style Transformer backbone shared by CALM and the discrete AR baseline.

RMSNorm, SwiGLU, rotary position embeddings, causal attention through torch's
scaled_dot_product_attention, and an explicit KV cache: past key/values go in and present
key/values come out as plain tensors, so the graph exports to ONNX with
`past_key_values.N.key/value` inputs. The backbone maps input vectors to hidden states; what a
position's input vector is (a token embedding or a compressed chunk) is the caller's business.

Padding: `attention_mask` [B, past+T] marks real positions (1) and left pads (0) of the whole
sequence, past included, as in Hugging Face. Pads are never attended by other positions;
each position always attends to itself so that a pad's own hidden state stays finite.
"""

import torch
import torch.nn.functional as F
from torch import nn

from model.config import BackboneConfig
from model.layers import SwiGLU, init_weights

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (key, value): [B, heads, S, head_dim]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real position (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_bias(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, q_len, S] for the last q_len queries: causal, pads hidden."""
    s = attention_mask.shape[-1]
    k_pos = torch.arange(s, device=attention_mask.device)
    q_pos = k_pos[s - q_len :, None]
    allowed = (k_pos <= q_pos) & attention_mask[:, None, :].bool()
    return (allowed | (k_pos == q_pos))[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on x [B, heads, T, head_dim], pairs (i, i + head_dim/2) as in Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        if mask is None:  # training: a plain causal sequence, no cache
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, d)), (k, v)


class Block(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.d_ff)

    def forward(self, x, cos, sin, mask, past):
        a, present = self.attn(self.attn_norm(x), cos, sin, mask, past)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), present


class Backbone(nn.Module):
    """Embedding table (used by the caller) + Transformer blocks + final RMSNorm."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        head_dim = config.d_model // config.n_heads
        inv_freq = config.rope_theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.apply(init_weights)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """x [B, T, d] input vectors -> (hidden [B, T, d], present key/values).

        Without `attention_mask` the rows are unpadded and (if there is no cache) plain causal
        attention is used; `position_ids` then default to past_len + 0..T-1.
        """
        b, t, _ = x.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if past_len + t > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {past_len + t} exceeds max_seq_len={self.config.max_seq_len}"
            )
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past_len, past_len + t, device=x.device).expand(b, t)
            else:
                position_ids = positions_from_mask(attention_mask)[:, -t:]
        if attention_mask is None and past_key_values is not None:
            attention_mask = torch.ones(b, past_len + t, dtype=torch.bool, device=x.device)
        mask = None if attention_mask is None else attention_bias(attention_mask, t)
        freqs = position_ids[:, None, :, None].float() * self.inv_freq  # [B, 1, T, head_dim/2]
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        presents: KVCache = []
        for i, block in enumerate(self.blocks):
            x, present = block(
                x, cos, sin, mask, None if past_key_values is None else past_key_values[i]
            )
            presents.append(present)
        return self.norm(x), presents
