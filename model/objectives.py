"""Training objectives around CALM: what the backbone learns from, beyond the energy score.

The energy score teaches the backbone only through the head's sample directions, which is slow
for a model that must copy numbers from its prompt (pipeline/training/README.md, the recipe
study). `CALMObjective` adds, for training only, a discrete auxiliary head: a linear map from the
backbone's state at position i to the K tokens of chunk i+1, with cross-entropy, as in the CALM
authors' patch-level training (shaochenze/PatchTrain), so the backbone gets a token-level signal
of what comes next. The head is not part of CALM: checkpoints, exported graphs and bundles hold
the CALM module alone, and generation still samples the energy head and decodes with the
autoencoder.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.calm import CALM
from model.layers import init_weights


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # what the optimiser minimises
    energy: torch.Tensor  # CALM's energy loss on the scored chunks
    auxiliary: torch.Tensor  # next-chunk cross-entropy per token (0 without the head)


class CALMObjective(nn.Module):
    """CALM's energy loss + `aux_weight` x next-chunk cross-entropy, targets shrunk by
    `target_scale` (model.calm.energy_loss)."""

    def __init__(self, calm: CALM, aux_weight: float = 0.0, target_scale: float = 1.0):
        super().__init__()
        if aux_weight < 0 or not 0 <= target_scale <= 1:
            raise ValueError("aux_weight must be >= 0 and target_scale in [0, 1]")
        self.calm = calm
        self.aux_weight = aux_weight
        self.target_scale = target_scale
        c = calm.config
        self.aux_head = (
            nn.Linear(c.backbone.d_model, c.k * c.backbone.vocab_size) if aux_weight > 0 else None
        )
        if self.aux_head is not None:
            init_weights(self.aux_head)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> ObjectiveOutput:
        out = self.calm(ids, targets, self.target_scale)
        if self.aux_head is None:
            return ObjectiveOutput(loss=out.loss, energy=out.loss, auxiliary=out.loss * 0.0)
        k, vocab = self.calm.config.k, self.calm.config.backbone.vocab_size
        b, t = ids.shape
        next_chunks = ids.view(b, t // k, k)[:, 1:][out.scored]  # [P, K]
        logits = self.aux_head(out.hidden[out.scored]).view(-1, k, vocab)
        if len(next_chunks) == 0:
            auxiliary = logits.sum() * 0.0
        else:
            auxiliary = F.cross_entropy(logits.flatten(0, 1).float(), next_chunks.flatten())
        return ObjectiveOutput(
            loss=out.loss + self.aux_weight * auxiliary, energy=out.loss, auxiliary=auxiliary
        )
