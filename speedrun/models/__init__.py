"""Models: the registered networks recipes name, and a user's own.

``model.name`` is a registered name (``speedrun models``... listed by ``MODELS``) or an import path
``package.module:factory`` to a user's factory, called as ``factory(in_channels=, num_classes=,
image_size=)`` and returning an ``nn.Module`` that maps normalized images (N, C, H, W) to logits
(N, classes). ``speedrun.train(model=...)`` also takes the factory or a module itself.

A model may define ``init_from_data(images)``: the patch-whitening technique calls it once, inside
the clock, with normalized unaugmented training images. A model with ``stem_parameters()`` (the
parameters of its first layer and of the normalization after it) supports ``model.stem_train_frac``;
one with ``block_parameters()`` (a list of parameters per block after the first layer, from the input
on) supports ``model.block_train_fracs``.
What each technique needs of a model is checked on a probe before a run starts
(``speedrun.techniques.registry.check_model``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

from speedrun.config import ConfigError, ModelConfig
from speedrun.models.airbench import AirbenchNet
from speedrun.models.convnet import ConvNet, MnistNet
from speedrun.models.resnet import RESNET18_BLOCKS, BasicBlock, ResNet


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[ModelConfig, int, int, tuple[int, int]], nn.Module]
    description: str
    stems: tuple[str, ...] = ("conv",)  # the model.stem values it implements


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("convnet", lambda cfg, c, k, hw: ConvNet(cfg, c, k),
              "conv-BN-act blocks with max-pool (airbench style); widths set per stage", stems=("conv", "whiten")),
    ModelSpec("mnist-net", lambda cfg, c, k, hw: MnistNet(c, k, hw),
              "the PyTorch examples' MNIST network: 2 convs, dropout, fc 128 (the baseline)"),
    ModelSpec("airbench", lambda cfg, c, k, hw: AirbenchNet(cfg, c, k),
              "airbench94's net: patch-whitening stem, conv groups (conv-pool-BN-GELU, conv-BN-GELU), "
              "max head", stems=("conv", "whiten")),
    ModelSpec("resnet50", lambda cfg, c, k, hw: ResNet(cfg, c, k),
              "ResNet-50 v1.5: bottleneck blocks (3, 4, 6, 3); model.widths are the stage widths",
              stems=("conv", "small")),
    ModelSpec("resnet18", lambda cfg, c, k, hw: ResNet(cfg, c, k, RESNET18_BLOCKS, BasicBlock),
              "ResNet-18: basic blocks (2, 2, 2, 2) of two 3x3 convs; model.widths are the stage widths",
              stems=("conv", "small")),
)}

# What ``speedrun.train(model=...)`` takes: a registered name or import path, a factory, or a module.
ModelArg = Union[str, Callable[..., nn.Module], nn.Module, None]


def is_import_path(name: str) -> bool:
    """``package.module:factory`` names a user's factory; registered names have no colon."""
    return ":" in name


def model_label(model: ModelArg) -> str | None:
    """The ``model.name`` recorded for a model given to ``train``: its import path where it has one."""
    if model is None or isinstance(model, str):
        return model
    kind = type(model) if isinstance(model, nn.Module) else model
    return f"{getattr(kind, '__module__', '?')}:{getattr(kind, '__qualname__', type(kind).__name__)}"


def import_factory(path: str) -> Callable[..., nn.Module]:
    """The callable at ``package.module:name`` (``name`` may be dotted: ``module:Class.build``)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model {path!r}: give a factory as package.module:function")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the module raises while importing
        raise ConfigError(f"model {path!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model {path!r}: {attr!r} is not callable")
    return obj


def call_factory(factory: Callable[..., nn.Module], name: str, *, in_channels: int, num_classes: int,
                 image_size: tuple[int, int]) -> nn.Module:
    """``factory(in_channels=, num_classes=, image_size=)``, checked to return a module."""
    try:
        model = factory(in_channels=in_channels, num_classes=num_classes, image_size=tuple(image_size))
    except Exception as e:
        raise ConfigError(f"model factory {name} failed for in_channels={in_channels}, num_classes={num_classes}, "
                          f"image_size={tuple(image_size)} ({type(e).__name__}: {e}); it is called with these "
                          "three keywords") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ConfigError where ``cfg`` asks a registered model for something it does not implement
    (called before a run starts, so bad input is refused rather than recorded as a failed run)."""
    if is_import_path(cfg.name):
        if cfg.stem == "small":
            raise ConfigError("model.stem=small is an option of the built-in resnet50, not of a model of your own")
        return
    if cfg.name not in MODELS:
        raise ConfigError(f"unknown model {cfg.name!r}; known: {', '.join(MODELS)}, or a factory of your own "
                          "as package.module:function")
    spec = MODELS[cfg.name]
    if cfg.stem not in spec.stems:
        raise ConfigError(f"model {cfg.name!r} has no model.stem={cfg.stem!r}; it has: {', '.join(spec.stems)}")


def build_model(cfg: ModelConfig, *, in_channels: int, num_classes: int, image_size: tuple[int, int],
                factory: Callable[..., nn.Module] | None = None) -> nn.Module:
    """A new model for ``cfg``: the registered one it names, or ``factory`` (imported from ``cfg.name``
    when that is an import path and no factory is given)."""
    check_model_config(cfg)
    if factory is None and is_import_path(cfg.name):
        factory = import_factory(cfg.name)
    if factory is not None:
        return call_factory(factory, cfg.name, in_channels=in_channels, num_classes=num_classes,
                            image_size=image_size)
    return MODELS[cfg.name].build(cfg, in_channels, num_classes, image_size)


@torch.no_grad()
def check_output(model: nn.Module, name: str, *, in_channels: int, num_classes: int,
                 image_size: tuple[int, int]) -> None:
    """Refuse a model whose logits for a batch of two images are not (2, num_classes)."""
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, in_channels, *image_size))
    except Exception as e:
        raise ConfigError(f"model {name} fails on a batch of {in_channels}-channel {image_size[0]}x{image_size[1]} "
                          f"images ({type(e).__name__}: {e})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {name} returns {shape} for a batch of 2 images; expected logits of shape "
                          f"(2, {num_classes}) for this dataset's {num_classes} classes")
