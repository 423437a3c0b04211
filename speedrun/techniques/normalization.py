"""BatchNorm tricks applied to a built model: zero-init residual branches, BN momentum, frozen scales.

Each is a function on any ``nn.Module``; ``apply_norm_options`` applies the recipe's choices once,
after the model is built and before the optimizer collects its parameters.

Convention for residual models: the BatchNorm that ends a residual branch (the last one before the
branch is added to the skip path) is marked with ``mark_residual_end(bn)``, which sets the attribute
``RESIDUAL_END`` on it. ``zero_init_residual_bn`` zeroes the γ of exactly those layers.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from speedrun.config import ConfigError, ModelConfig

RESIDUAL_END = "ends_residual_branch"


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (1d, 2d, 3d, sync) in ``model``."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def mark_residual_end(bn: _BatchNorm) -> _BatchNorm:
    """Mark ``bn`` as the last BatchNorm of a residual branch; returns it, for use inside constructors.

    >>> branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), mark_residual_end(nn.BatchNorm2d(8)))
    """
    setattr(bn, RESIDUAL_END, True)
    return bn


def zero_init_residual_bn(model: nn.Module) -> int:
    """Set γ = 0 in each BatchNorm marked as the end of a residual branch; returns how many.

    Every residual block then starts as the identity (Goyal et al. 2017, §5.1): the signal passes
    through the skip paths only, so a deep net behaves like a shallow one early on and tolerates a
    higher initial LR. The branches start learning at once, since the gradient of γ is not zero.
    """
    marked = [bn for bn in batchnorms(model) if getattr(bn, RESIDUAL_END, False) and bn.weight is not None]
    for bn in marked:
        nn.init.zeros_(bn.weight)
    return len(marked)


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set every BatchNorm's running-statistics momentum (PyTorch's: the weight of the new batch).

    Higher than the default 0.1 makes the running statistics follow fast-changing weights, which
    short schedules and weight averaging need (airbench uses 0.4); returns how many layers were set.
    """
    layers = batchnorms(model)
    for bn in layers:
        bn.momentum = momentum
    return len(layers)


def freeze_bn_scales(model: nn.Module) -> int:
    """Fix every BatchNorm γ at its current value (1 at init): ``requires_grad = False``; returns how many.

    Followed by a conv or linear layer, a per-channel scale is redundant with that layer's weights;
    freezing it (airbench) saves its update and keeps weight decay from shrinking it.
    """
    scales = [bn.weight for bn in batchnorms(model) if bn.weight is not None]
    for w in scales:
        w.requires_grad_(False)
    return len(scales)


def norm_biases(model: nn.Module) -> list[nn.Parameter]:
    """The trainable biases (β) of the BatchNorm layers, which ``optim.bias_lr_scale`` puts in a group of their own."""
    return [bn.bias for bn in batchnorms(model) if bn.bias is not None and bn.bias.requires_grad]


def apply_norm_options(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Apply the recipe's BatchNorm options to ``model`` in place (returned for chaining).

    An option asked for on a model it cannot act on is an error, so that an ablation never
    measures a switch that did nothing.
    """
    wanted = cfg.zero_init_residual or cfg.bn_momentum is not None or cfg.bn_frozen_scale
    if wanted and not batchnorms(model):
        raise ConfigError(f"model {cfg.name!r} has no BatchNorm layers for the model.bn_* / "
                          "model.zero_init_residual options")
    if cfg.zero_init_residual and zero_init_residual_bn(model) == 0:
        raise ConfigError(f"model.zero_init_residual: model {cfg.name!r} marks no BatchNorm as the end of a "
                          "residual branch (speedrun.techniques.normalization.mark_residual_end)")
    if cfg.bn_momentum is not None:
        set_bn_momentum(model, cfg.bn_momentum)
    if cfg.bn_frozen_scale:
        freeze_bn_scales(model)
    return model
