"""Stage configs of the training job: one YAML file plus `--set stage.field=value` overrides.

The stages run in the order tokenizer -> autoencoder -> calm and/or ar. CALM needs the frozen
autoencoder; the AR baseline needs only the tokenizer. Model sections are the model library's
own config dataclasses (model/config.py), validated by pydantic, so a typo or an impossible
shape fails before anything starts; `vocab_size` always comes from the trained tokenizer and
CALM's autoencoder config from the autoencoder stage, so neither may be set here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.config import ARConfig, AutoencoderConfig, CALMConfig
from pipeline.settings import SettingsError, parse_overrides

STAGES = ("tokenizer", "autoencoder", "calm", "ar")
MODEL_STAGES = ("autoencoder", "calm", "ar")
REQUIRES: dict[str, tuple[str, ...]] = {
    "tokenizer": (),
    "autoencoder": ("tokenizer",),
    "calm": ("tokenizer", "autoencoder"),
    "ar": ("tokenizer",),
}
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "domain.yaml"


class TrainConfigError(ValueError):
    """A config file or override that cannot describe a training run; names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainSpec(_Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(
        ge=1, description="global: chunks (autoencoder) or rows; split over workers"
    )
    row_len: int = Field(256, ge=2, description="tokens per packed row (calm, ar)")
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay floor as a share of lr")
    warmup: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    checkpoint_every: int = Field(ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    stop_after_step: int | None = Field(
        None, ge=1, description="stop right after this step's checkpoint, as a killed job would"
    )
    log_samples: bool = Field(False, description="record the sample indices each rank trains on")
    rows: Literal["stream", "documents"] = Field(
        "stream",
        description="calm, ar: rows cut from the token stream at any offset, or rows that start "
        "at a document laid out on chunk boundaries (a prompt is never cut off)",
    )
    loss_on: Literal["all", "summary"] = Field(
        "all", description="calm, ar: learn every token, or a domain summary's only"
    )
    aux_weight: float = Field(
        0.0, ge=0, description="calm: weight of the training-only next-chunk cross-entropy head"
    )
    target_scale: float = Field(
        1.0, ge=0, le=1, description="calm: std of the energy-loss targets, x the posterior's"
    )

    @model_validator(mode="after")
    def _stop_on_a_checkpoint(self) -> TrainSpec:
        if self.stop_after_step is not None and self.stop_after_step % self.checkpoint_every:
            raise ValueError("stop_after_step must be a multiple of checkpoint_every")
        return self


class EvalSpec(_Strict):
    recon_chunks: int = Field(4096, ge=1, description="held-out chunks for reconstruction accuracy")
    noise_sigma: float = Field(0.3, ge=0, description="latent noise of the robustness check")
    brier_positions: int = Field(512, ge=2, description="held-out positions scored by BrierLM")
    brier_batch: int = Field(64, ge=1)
    fact_prompts: int = Field(32, ge=0, description="domain corpus: summaries generated and scored")
    max_new_tokens: int = Field(160, ge=1)
    temperature: float = Field(0.5, gt=0, le=1)
    sampler: Literal["adaptive", "exact", "approximate"] = "adaptive"


class TokenizerStage(_Strict):
    vocab_size: int = Field(4096, ge=260)


class _ModelStage(_Strict):
    """A model stage: the model library's config, the training and the evaluation settings.

    Subclasses declare `model`; `DERIVED` names the model fields the earlier stages decide.
    """

    DERIVED: ClassVar[tuple[str, ...]] = ("vocab_size",)
    train: TrainSpec
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @field_validator("model", mode="before", check_fields=False)
    @classmethod
    def _no_derived_fields(cls, value: Any) -> Any:
        if isinstance(value, dict):
            backbone = value.get("backbone")
            for name in cls.DERIVED:
                if name in value or (isinstance(backbone, dict) and name in backbone):
                    raise ValueError(
                        f"{name} cannot be set: it comes from the "
                        + ("autoencoder stage" if name == "autoencoder" else "tokenizer")
                    )
        return value


class _SequenceStage(_ModelStage):
    """CALM and AR: rows of `row_len` tokens, `row_len / k` backbone positions."""

    @model_validator(mode="after")
    def _rows_fit(self) -> Self:
        k = self.model.k
        if self.train.row_len % k or self.train.row_len // k < 2:
            raise ValueError(f"train.row_len must be a multiple of k={k} covering >= 2 positions")
        if self.train.row_len // k > self.model.backbone.max_seq_len:
            raise ValueError(f"train.row_len / k={k} exceeds model.backbone.max_seq_len")
        return self


def _refuse_calm_options(train: TrainSpec, stage: str) -> None:
    if train.aux_weight or train.target_scale != 1.0:
        raise ValueError(f"train.aux_weight and train.target_scale apply to calm, not {stage}")


class AutoencoderStage(_ModelStage):
    model: AutoencoderConfig = Field(default_factory=AutoencoderConfig)

    @model_validator(mode="after")
    def _rows_options(self) -> Self:
        _refuse_calm_options(self.train, "autoencoder")
        if self.train.rows != "stream" or self.train.loss_on != "all":
            raise ValueError("train.rows and train.loss_on apply to calm and ar")
        return self


class CALMStage(_SequenceStage):
    DERIVED: ClassVar[tuple[str, ...]] = ("vocab_size", "autoencoder")
    model: CALMConfig = Field(default_factory=CALMConfig)


class ARStage(_SequenceStage):
    model: ARConfig = Field(default_factory=ARConfig)

    @model_validator(mode="after")
    def _no_calm_options(self) -> Self:
        _refuse_calm_options(self.train, "ar")
        return self


class TrainConfig(_Strict):
    seed: int = 0
    valid_fraction: float = Field(
        0.1, gt=0, lt=1, description="plain-text corpus: share of documents held out for validation"
    )
    tokenizer: TokenizerStage = Field(default_factory=TokenizerStage)
    autoencoder: AutoencoderStage
    calm: CALMStage
    ar: ARStage

    def stage(self, name: str) -> AutoencoderStage | CALMStage | ARStage:
        if name not in MODEL_STAGES:
            raise KeyError(name)
        return getattr(self, name)


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_train_config(
    path: str | Path | None = None, assignments: list[str] | None = None
) -> TrainConfig:
    """The config file (default: the domain recipe) with `stage.field=value` overrides on top."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise TrainConfigError(f"config file {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise TrainConfigError(f"config file {path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"config file {path}: expected a mapping at the top level")
    try:
        data = deep_merge(data, parse_overrides(list(assignments or [])))
    except SettingsError as error:
        raise TrainConfigError(str(error)) from None
    return validate_train_config(data, origin=str(path))


def validate_train_config(data: dict[str, Any], origin: str = "config") -> TrainConfig:
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        lines = [
            f"  {'.'.join(str(p) for p in item['loc']) or 'config'}: "
            f"{item['msg'].removeprefix('Value error, ')}"
            for item in error.errors(include_input=False, include_url=False)
        ]
        raise TrainConfigError(
            f"invalid training config ({origin}):\n" + "\n".join(lines)
        ) from None


def plan_stages(requested: list[str]) -> list[str]:
    """The requested stages plus everything they need, in run order ('all' means every stage)."""
    wanted = set(STAGES) if "all" in requested else set(requested)
    unknown = wanted - set(STAGES)
    if unknown:
        raise TrainConfigError(
            f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}"
        )
    for stage in list(wanted):
        wanted.update(REQUIRES[stage])
    return [s for s in STAGES if s in wanted]


# Fields that change how a run is watched or stored, not the weights it produces.
OPERATIONAL = {
    "stop_after_step",
    "log_every",
    "log_samples",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
}


def stage_record(config: TrainConfig, stage: str) -> dict[str, Any]:
    """The part of the config that decides a stage's weights: a resumed run must not change it."""
    if stage == "tokenizer":
        return {
            "seed": config.seed,
            "valid_fraction": config.valid_fraction,
            **config.tokenizer.model_dump(),
        }
    section = config.stage(stage)
    return {
        "seed": config.seed,
        "valid_fraction": config.valid_fraction,
        "model": _without_derived(dataclasses.asdict(section.model)),
        "train": section.train.model_dump(exclude=OPERATIONAL),
    }


def _without_derived(model: dict[str, Any]) -> dict[str, Any]:
    """A model config without what the earlier stages decide (vocabulary, CALM's autoencoder)."""
    return {
        key: _without_derived(value) if isinstance(value, dict) else value
        for key, value in model.items()
        if key not in ("vocab_size", "autoencoder")
    }
