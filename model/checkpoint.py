"""Checkpoints: weights in safetensors, the model's config as JSON beside them.

A checkpoint directory holds `model.safetensors` and `config.json`; loading rebuilds the model
from the config and refuses any missing or unexpected weight (strict). The autoencoder's tied
output projection is its embedding table itself, so it is stored once.
"""

from pathlib import Path

from safetensors.torch import load_model, save_model

from model.ar import ARModel
from model.autoencoder import Autoencoder
from model.calm import CALM
from model.config import ARConfig, AutoencoderConfig, CALMConfig, load_config, save_config

WEIGHTS, CONFIG = "model.safetensors", "config.json"
Model = Autoencoder | CALM | ARModel


def build_model(config: AutoencoderConfig | CALMConfig | ARConfig) -> Model:
    if isinstance(config, AutoencoderConfig):
        return Autoencoder(config)
    if isinstance(config, CALMConfig):
        return CALM(config)
    if isinstance(config, ARConfig):
        return ARModel(config)
    raise TypeError(f"no model for config type {type(config).__name__}")


def save_checkpoint(model: Model, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_config(model.config, directory / CONFIG)
    save_model(model, str(directory / WEIGHTS))
    return directory


def load_checkpoint(directory: str | Path, device: str = "cpu") -> Model:
    directory = Path(directory)
    model = build_model(load_config(directory / CONFIG))
    load_model(model, str(directory / WEIGHTS), strict=True)
    return model.to(device).eval()
