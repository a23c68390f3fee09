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


# Every arm states each recipe option it trains with, so that no arm inherits the study's config
# (the domain recipe) by accident.
FIRST = {"rows": "stream", "loss_on": "all"}  # the first recipe, for CALM and AR alike
CALM_FIRST = FIRST | {"aux_weight": 0.0, "target_scale": 1.0}
ALIGNED = CALM_FIRST | {"rows": "documents", "loss_on": "summary"}
AUX = ALIGNED | {"aux_weight": 1.0}
AUX_MEAN = AUX | {"target_scale": 0.0}  # calm-events-2.1.0's recipe
# the CALM authors' optimiser for energy-trained models (shaochenze/EAR)
EAR: dict[str, Any] = {"schedule": "constant", "warmup_fraction": 0.1, "head_lr_ratio": 0.25}
ARMS = {
    arm.name: arm
    for arm in (
        Arm(
            "control",
            "the first recipe: rows at any stream offset, loss on every chunk",
            train=CALM_FIRST,
        ),
        Arm(
            "documents",
            "rows start at a document: no prompt cut off",
            train=CALM_FIRST | {"rows": "documents"},
        ),
        Arm(
            "summary-loss",
            "loss on the summary's chunks only",
            train=CALM_FIRST | {"loss_on": "summary"},
        ),
        Arm("aligned", "document rows + summary-only loss (instruction tuning)", train=ALIGNED),
        Arm("aux", "+ training-only next-chunk cross-entropy head (PatchTrain)", train=AUX),
        Arm("aux-mean-targets", "+ energy targets at the posterior mean", train=AUX_MEAN),
        Arm(
            "mean-targets-no-aux",
            "aligned + mean targets, no auxiliary head: is the second signal needed?",
            train=ALIGNED | {"target_scale": 0.0},
        ),
        Arm(
            "aux3-mean-targets",
            "aux-mean-targets with the auxiliary head at weight 3",
            train=AUX_MEAN | {"aux_weight": 3.0},
        ),
        Arm(
            "aux-mean-targets-lr3e-3",
            "aux-mean-targets at twice the learning rate",
            train=AUX_MEAN | {"lr": 3e-3},
        ),
        Arm(
            "aux-mean-targets-batch32",
            "aux-mean-targets with 32 rows a step (twice the tokens, and CPU time, per step)",
            train=AUX_MEAN | {"batch_size": 32},
        ),
        Arm(
            "aux-mean-targets-ear",
            "aux-mean-targets with the authors' optimiser (EAR)",
            train=AUX_MEAN,
            **EAR,
        ),
        Arm("recipe", "the study's config as it is (default: configs/domain.yaml)"),
        Arm(
            "aux-half-noise",
            "+ energy targets with half the posterior std",
            train=AUX | {"target_scale": 0.5},
        ),
        Arm(
            "aux-ear-optimizer",
            "+ the authors' optimiser: longer warm-up, constant rate, head at 1/4 lr (EAR)",
            train=AUX,
            **EAR,
        ),
        Arm("aux-bf16", "+ bfloat16 autocast: more steps in the same clock", train=AUX, bf16=True),
        Arm("ar-control", "AR baseline, the first recipe", model="ar", train=FIRST),
        Arm(
            "ar-aligned",
            "AR baseline, document rows + summary-only loss",
            model="ar",
            train={"rows": "documents", "loss_on": "summary"},
        ),
    )
}
