"""Registered networks: frozen records that the CLI can list and recipes name.

A model may define ``init_from_data(images)``: the trainer calls it once, inside the clock, with
normalized unaugmented training images, for initialisations that depend on the data (patch whitening).
A model with ``stem_parameters()`` (the parameters of its first layer and of the normalization after
it) supports ``model.stem_train_frac`` (speedrun.techniques.freezing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from speedrun.config import ConfigError, ModelConfig
from speedrun.models.airbench import AirbenchNet
from speedrun.models.convnet import ConvNet, MnistNet
from speedrun.models.resnet import ResNet


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[ModelConfig, int, int, tuple[int, int]], nn.Module]
    description: str
    stems: tuple[str, ...] = ("conv",)  # the model.stem values it implements
    dirac: bool = False  # whether it implements model.dirac
    stem_freezing: bool = False  # whether it has stem_parameters(), for model.stem_train_frac < 1


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("convnet", lambda cfg, c, k, hw: ConvNet(cfg, c, k),
              "conv-BN-act blocks with max-pool (airbench style); widths set per stage",
              stems=("conv", "whiten"), dirac=True, stem_freezing=True),
    ModelSpec("mnist-net", lambda cfg, c, k, hw: MnistNet(c, k, hw),
              "the PyTorch examples' MNIST network: 2 convs, dropout, fc 128 (the baseline)"),
    ModelSpec("airbench", lambda cfg, c, k, hw: AirbenchNet(cfg, c, k),
              "airbench94's net: patch-whitening stem, conv groups (conv-pool-BN-GELU, conv-BN-GELU), "
              "max head", stems=("conv", "whiten"), dirac=True, stem_freezing=True),
    ModelSpec("resnet50", lambda cfg, c, k, hw: ResNet(cfg, c, k),
              "ResNet-50 v1.5: bottleneck blocks (3, 4, 6, 3); model.widths are the stage widths",
              stems=("conv", "small"), stem_freezing=True),
)}


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ConfigError where ``cfg`` asks a model for something it does not implement (called before a
    run starts, so bad input is refused rather than recorded as a failed run)."""
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[cfg.name]
    if cfg.stem not in spec.stems:
        raise ConfigError(f"model {cfg.name!r} has no model.stem={cfg.stem!r}; it has: {', '.join(spec.stems)}")
    if cfg.dirac and not spec.dirac:
        with_dirac = ", ".join(s.name for s in MODELS.values() if s.dirac)
        raise ConfigError(f"model.dirac is not implemented by {cfg.name!r}; models with it: {with_dirac}")
    if cfg.stem_train_frac < 1 and not spec.stem_freezing:
        with_it = ", ".join(s.name for s in MODELS.values() if s.stem_freezing)
        raise ConfigError(f"model.stem_train_frac < 1 is not implemented by {cfg.name!r}; models with it: {with_it}")


def build_model(cfg: ModelConfig, *, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    check_model_config(cfg)
    spec = MODELS[cfg.name]
    return spec.build(cfg, in_channels, num_classes, image_size)
