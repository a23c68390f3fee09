"""Model configurations: one dataclass per model, saved as JSON beside the weights.

Defaults are scaled down from the paper (docs/model.md) so that every model trains on a laptop CPU;
the paper's values are noted per field.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID


@dataclass(frozen=True)
class AutoencoderConfig:
    vocab_size: int = 1024
    k: int = 4  # tokens per chunk (paper 4)
    latent_dim: int = 128  # as the paper: a wide latent is what makes it robust to noise
    d_model: int = 128  # paper 512
    d_ff: int = 320  # paper 1280
    n_layers: int = 2  # per side; half before the squeeze/after the expand (paper 2 + 2)
    kl_weight: float = 1e-3
    kl_clamp: float = 0.5  # per-dimension KL floor
    token_dropout: float = 0.15  # input ids replaced by <mask>
    latent_dropout: float = 0.15
    pad_id: int = PAD_ID
    mask_id: int = MASK_ID

    def __post_init__(self) -> None:
        if self.n_layers < 2 or self.n_layers % 2:
            raise ValueError(f"n_layers must be an even number >= 2, got {self.n_layers}")


@dataclass(frozen=True)
class BackboneConfig:
    """Llama-style Transformer shared by CALM and the discrete baseline."""

    vocab_size: int = 1024
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 352  # SwiGLU hidden size, about 8/3 * d_model
    max_seq_len: int = 1024  # positions (chunks for CALM, tokens for AR)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError("d_model / n_heads must be an even integer (RoPE rotates pairs)")


@dataclass(frozen=True)
class CALMConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    noise_dim: int = 64  # uniform noise in [-0.5, 0.5)
    head_layers: int = 4  # residual MLP blocks of the energy head (paper 4)
    n_samples: int = 8  # N model samples per position in the energy loss
    m_targets: int = 100  # M target samples from the encoder's Gaussian
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID

    @property
    def k(self) -> int:
        return self.autoencoder.k

    def __post_init__(self) -> None:
        if self.backbone.vocab_size != self.autoencoder.vocab_size:
            raise ValueError("backbone and autoencoder must share one vocabulary")
        if self.n_samples < 2:
            raise ValueError("the energy loss needs n_samples >= 2 (pairwise term)")


@dataclass(frozen=True)
class ARConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID

    @property
    def k(self) -> int:
        return 1  # one token per step: the same packing and generation code serves both models


CONFIG_TYPES = {c.__name__: c for c in (AutoencoderConfig, CALMConfig, ARConfig, BackboneConfig)}
AnyConfig = AutoencoderConfig | CALMConfig | ARConfig | BackboneConfig


def config_to_dict(config: AnyConfig) -> dict[str, Any]:
    return {"type": type(config).__name__, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> AnyConfig:
    data = dict(data)
    kind = data.pop("type")
    if kind not in CONFIG_TYPES:
        raise ValueError(f"unknown config type {kind!r}")
    cls = CONFIG_TYPES[kind]
    nested = {"backbone": BackboneConfig, "autoencoder": AutoencoderConfig}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {kind} fields: {sorted(unknown)}")
    kwargs = {k: nested[k](**v) if k in nested else v for k, v in data.items()}
    return cls(**kwargs)


def save_config(config: AnyConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def load_config(path: str | Path) -> AnyConfig:
    return config_from_dict(json.loads(Path(path).read_text()))
