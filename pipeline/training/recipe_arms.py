"""The recipe study's arms (pipeline.bench.recipe): torch-free, so that `--help` can
list them. Each arm names the training settings it changes and where its idea comes from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Arm:
    """One recipe: the training settings it changes, and where the idea comes from."""

    name: str
    idea: str
    model: Literal["calm", "ar"] = "calm"
    train: dict[str, Any] = field(default_factory=dict)  # TrainSpec fields
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = 0.03  # of the budget
    head_lr_ratio: float = 1.0  # the energy head's learning rate, x the backbone's
    bf16: bool = False  # bfloat16 autocast on the CPU


ALIGNED = {"rows": "documents", "loss_on": "summary"}
AUX = ALIGNED | {"aux_weight": 1.0}
ARMS = {
    arm.name: arm
    for arm in (
        Arm("control", "today's recipe: rows at any stream offset, loss on every chunk"),
        Arm(
            "documents", "rows start at a document: no prompt cut off", train={"rows": "documents"}
        ),
        Arm("summary-loss", "loss on the summary's chunks only", train={"loss_on": "summary"}),
        Arm("aligned", "document rows + summary-only loss (instruction tuning)", train=ALIGNED),
        Arm("aux", "+ training-only next-chunk cross-entropy head (PatchTrain)", train=AUX),
        Arm(
            "aux-mean-targets",
            "+ energy targets at the posterior mean",
            train=AUX | {"target_scale": 0.0},
        ),
        Arm(
            "aux-half-noise",
            "+ energy targets with half the posterior std",
            train=AUX | {"target_scale": 0.5},
        ),
        Arm(
            "aux-ear-optimizer",
            "+ the authors' optimiser: longer warm-up, constant rate, head at 1/4 lr (EAR)",
            train=AUX,
            schedule="constant",
            warmup_fraction=0.1,
            head_lr_ratio=0.25,
        ),
        Arm("aux-bf16", "+ bfloat16 autocast: more steps in the same clock", train=AUX, bf16=True),
        Arm("ar-control", "AR baseline, today's recipe", model="ar"),
        Arm(
            "ar-aligned",
            "AR baseline, document rows + summary-only loss",
            model="ar",
            train=ALIGNED,
        ),
    )
}
