"""Learning-rate schedules as pure functions of training progress, and the hook that applies them.

Each function returns a multiplier of the peak LR, so the same shape serves any batch size.
"""
from __future__ import annotations

import math

from speedrun.config import ScheduleConfig


def one_cycle(progress: float, *, warmup_frac: float = 0.25, start_factor: float = 0.1,
              end_factor: float = 0.0) -> float:
    """Triangular one-cycle (Smith 2018; airbench): linear rise to 1 at ``warmup_frac``, then linear fall.

    >>> one_cycle(0.0, start_factor=0.1), one_cycle(0.25), one_cycle(1.0)
    (0.1, 1.0, 0.0)
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_frac:
        return start_factor + (1.0 - start_factor) * progress / warmup_frac
    return 1.0 + (end_factor - 1.0) * (progress - warmup_frac) / (1.0 - warmup_frac)


def warmup_cosine(progress: float, *, warmup_frac: float = 0.05, start_factor: float = 0.0,
                  end_factor: float = 0.0) -> float:
    """Linear warm-up to 1 at ``warmup_frac`` (Goyal et al. 2017), then a half cosine down to ``end_factor``.

    >>> warmup_cosine(0.5, warmup_frac=0.0), warmup_cosine(1.0, warmup_frac=0.0, end_factor=0.1)
    (0.5, 0.1)
    """
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_frac:
        return start_factor + (1.0 - start_factor) * progress / warmup_frac
    t = (progress - warmup_frac) / (1.0 - warmup_frac)
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * t))


def cycled_momentum(progress: float, *, warmup_frac: float, high: float, low: float) -> float:
    """Momentum mirroring the one-cycle LR: ``high`` -> ``low`` during warm-up, back to ``high`` at the end."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < warmup_frac:
        return high + (low - high) * progress / warmup_frac
    return low + (high - low) * (progress - warmup_frac) / (1.0 - warmup_frac)


def step_decay(epoch: float, *, gamma: float) -> float:
    """Multiply by ``gamma`` at the end of every whole epoch (PyTorch's StepLR with step_size=1)."""
    return gamma ** int(epoch)


def lr_factor(cfg: ScheduleConfig, *, progress: float, epoch: float) -> float:
    if cfg.kind == "one-cycle":
        return one_cycle(progress, warmup_frac=cfg.warmup_frac, start_factor=cfg.start_factor,
                         end_factor=cfg.end_factor)
    if cfg.kind == "cosine":
        return warmup_cosine(progress, warmup_frac=cfg.warmup_frac, start_factor=cfg.start_factor,
                             end_factor=cfg.end_factor)
    if cfg.kind == "step":
        return step_decay(epoch, gamma=cfg.step_gamma)
    return 1.0


class LRSchedule:
    """Sets every param group's LR to its ``peak_lr`` times the schedule, before each batch; with
    ``momentum_low`` it also cycles the momentum (SGD's ``momentum``, Adam's first beta)."""

    def __init__(self, cfg: ScheduleConfig, *, momentum: float = 0.0) -> None:
        self.cfg, self.momentum = cfg, momentum

    def before_batch(self, state) -> None:
        factor = lr_factor(self.cfg, progress=state.progress, epoch=state.epoch_float)
        cycle = self.cfg.momentum_low > 0
        if cycle:
            m = cycled_momentum(state.progress, warmup_frac=self.cfg.warmup_frac, high=self.momentum,
                                low=self.cfg.momentum_low)
        for group in state.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
            if cycle and "momentum" in group:
                group["momentum"] = m
            elif cycle and "betas" in group:
                group["betas"] = (m, group["betas"][1])
