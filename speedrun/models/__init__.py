"""Registered networks: frozen records that the CLI can list and recipes name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from speedrun.config import ConfigError, ModelConfig
from speedrun.models.convnet import ConvNet, MnistNet


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[ModelConfig, int, int, tuple[int, int]], nn.Module]
    description: str


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("convnet", lambda cfg, c, k, hw: ConvNet(cfg, c, k),
              "conv-BN-act blocks with max-pool (airbench style); widths set per stage"),
    ModelSpec("mnist-net", lambda cfg, c, k, hw: MnistNet(c, k, hw),
              "the PyTorch examples' MNIST network: 2 convs, dropout, fc 128 (the baseline)"),
)}


def build_model(cfg: ModelConfig, *, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.name!r}; known: {', '.join(MODELS)}")
    return MODELS[cfg.name].build(cfg, in_channels, num_classes, image_size)
