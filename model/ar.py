"""Discrete autoregressive baseline: the same backbone with a token LM head (K = 1).

It shares model/backbone.py block for block with CALM, so quality and cost are compared like for
like; the output projection is untied, as in the paper's Transformer baselines.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import Backbone
from model.config import ARConfig
from model.layers import init_weights


@dataclass
class AROutput:
    loss: torch.Tensor  # mean next-token cross-entropy
    logits: torch.Tensor  # [B, T-1, vocab]


class ARModel(nn.Module):
    def __init__(self, config: ARConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone)
        self.lm_head = nn.Linear(config.backbone.d_model, config.backbone.vocab_size, bias=False)
        init_weights(self.lm_head)

    def embed_chunks(self, chunks: torch.Tensor) -> torch.Tensor:
        """chunks [B, T, 1] token ids -> backbone inputs [B, T, d] (the generation interface)."""
        return self.backbone.wte(chunks[..., 0])

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> AROutput:
        """Cross-entropy of packed rows ids [B, T]: token t-1 predicts token t.

        `targets` [B, T] (bool) marks the tokens to learn (e.g. a summary's, not its prompt's);
        None learns every token after the first.
        """
        if ids.shape[1] < 2:
            raise ValueError("rows need at least 2 tokens")
        hidden, _ = self.backbone(self.backbone.wte(ids[:, :-1]))
        logits = self.lm_head(hidden)
        losses = F.cross_entropy(
            logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none"
        )
        if targets is None:
            return AROutput(loss=losses.mean(), logits=logits)
        weights = targets[:, 1:].flatten().float()
        return AROutput(loss=(losses * weights).sum() / weights.sum().clamp(min=1), logits=logits)
