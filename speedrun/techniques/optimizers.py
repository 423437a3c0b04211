"""The optimizer registry: ``optim.name`` -> a frozen record that builds it from parameter groups.

``param_groups`` splits a model's parameters the way the recipe asks (decay-free norms and biases,
BatchNorm biases at a multiple of the LR, conv filter banks apart for Muon) and gives every group its
``peak_lr`` (the schedule scales it) and weight decay; ``build_optimizer`` hands the groups to the
registered constructor. A new optimizer is a record here and its name in ``OptimConfig.name``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from speedrun.config import OptimConfig, Recipe
from speedrun.techniques.large_batch import LAMB, LARS, linear_scaled_lr, weight_decay_coefficient
from speedrun.techniques.muon import Muon
from speedrun.techniques.normalization import norm_biases


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    build: Callable[[list[dict], float, OptimConfig], torch.optim.Optimizer]  # (groups, peak LR, config)
    description: str
    orthogonal_filters: bool = False  # conv filter banks form a group of their own at optim.muon_lr


def _nesterov(cfg: OptimConfig) -> bool:
    return cfg.nesterov and cfg.momentum > 0  # torch refuses Nesterov without momentum


OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (
    OptimizerSpec("sgd", lambda groups, lr, cfg: torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum,
                                                                 nesterov=_nesterov(cfg)),
                  "SGD with (Nesterov) momentum"),
    OptimizerSpec("adamw", lambda groups, lr, cfg: torch.optim.AdamW(groups, lr=lr),
                  "Adam with decoupled weight decay (Loshchilov & Hutter 2019)"),
    OptimizerSpec("adadelta", lambda groups, lr, cfg: torch.optim.Adadelta(groups, lr=lr),
                  "Adadelta (the PyTorch MNIST example's optimizer: the baseline)"),
    OptimizerSpec("lars", lambda groups, lr, cfg: LARS(groups, lr=lr, momentum=cfg.momentum, nesterov=_nesterov(cfg),
                                                       trust_coefficient=cfg.trust_coefficient),
                  "SGD with layer-wise adaptive rate scaling (large batches)"),
    OptimizerSpec("lamb", lambda groups, lr, cfg: LAMB(groups, lr=lr),
                  "Adam with a layer-wise trust ratio (large batches)"),
    OptimizerSpec("muon", lambda groups, lr, cfg: Muon(groups, lr=lr, momentum=cfg.momentum,
                                                       muon_momentum=cfg.muon_momentum, nesterov=cfg.nesterov,
                                                       normalize=cfg.muon_normalize),
                  "orthogonalized momentum for conv filter banks, SGD for the rest", orthogonal_filters=True),
)}


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """The trainable parameters of ``model`` in groups, each with ``peak_lr`` set.

    Groups: weights (decayed; layer-wise adapted by LARS and LAMB); norm parameters and biases
    (decay-free unless ``optim.bn_weight_decay``; never adapted, as in the LARS paper and MLPerf);
    with ``optim.bias_lr_scale``, BatchNorm biases apart at that multiple of the LR. The LR follows
    ``linear_scaled_lr`` and each group's decay ``weight_decay_coefficient``. For an optimizer with
    ``orthogonal_filters`` (Muon) the filter banks (more than 2 dims) form a group of their own at
    ``optim.muon_lr``, without decay.
    """
    cfg = recipe.optim
    peak_lr = linear_scaled_lr(cfg.lr, batch_size=recipe.train.batch_size, reference_batch_size=cfg.lr_batch_size)
    scaled = {id(p) for p in norm_biases(model)} if cfg.bias_lr_scale != 1.0 else set()
    weights, small, biases = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (biases if id(p) in scaled else small if p.ndim <= 1 else weights).append(p)
    filters = [p for p in weights if p.ndim > 2] if OPTIMIZERS[cfg.name].orthogonal_filters else []
    weights = [p for p in weights if p.ndim <= 2] if filters else weights
    groups = [dict(params=filters, lr=cfg.muon_lr, peak_lr=cfg.muon_lr, weight_decay=0.0, adapt=False,
                   orthogonal=True)] if filters else []
    for params, lr_scale, decays, adapt in ((weights, 1.0, True, True), (small, 1.0, cfg.bn_weight_decay, False),
                                            (biases, cfg.bias_lr_scale, cfg.bn_weight_decay, False)):
        if params:
            lr = peak_lr * lr_scale
            wd = weight_decay_coefficient(cfg.weight_decay, group_lr=lr, base_lr=peak_lr,
                                          batch_size=recipe.train.batch_size, wd_batch_size=cfg.wd_batch_size)
            groups.append(dict(params=params, lr=lr, peak_lr=lr, weight_decay=wd if decays else 0.0, adapt=adapt))
    return groups


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``param_groups(model, recipe)``.

    >>> opt = build_optimizer(model, get_recipe("fashion-mnist"))  # doctest: +SKIP
    """
    cfg = recipe.optim
    peak_lr = linear_scaled_lr(cfg.lr, batch_size=recipe.train.batch_size, reference_batch_size=cfg.lr_batch_size)
    return OPTIMIZERS[cfg.name].build(param_groups(model, recipe), peak_lr, cfg)
