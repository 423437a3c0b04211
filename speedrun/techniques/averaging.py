"""Weight averaging: Lookahead-style (Zhang et al. 2019; airbench's scheduled variant)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from speedrun.config import AverageConfig


@torch.no_grad()
def lookahead_step(slow: Sequence[Tensor], fast: Sequence[Tensor], alpha: float) -> None:
    """``slow <- alpha * slow + (1 - alpha) * fast``, then ``fast <- slow`` (in place)."""
    for s, f in zip(slow, fast):
        s.lerp_(f, 1.0 - alpha)
        f.copy_(s)


def lookahead_alpha(progress: float, *, decay: float, every: int) -> float:
    """airbench's schedule: no averaging at the start, ``decay**every`` at the end, cubic in between."""
    return decay**every * progress**3


def _averaged_tensors(model: nn.Module) -> list[Tensor]:
    # Float parameters and BN running statistics; integer buffers (num_batches_tracked) are left alone.
    return [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]


class Lookahead:
    """Every ``every`` steps, pull the weights toward a slow copy; the last step always syncs."""

    def __init__(self, cfg: AverageConfig) -> None:
        self.cfg = cfg
        self.slow: list[Tensor] = []

    def before_fit(self, state) -> None:
        self.slow = [t.detach().clone() for t in _averaged_tensors(state.model)]

    def after_step(self, state) -> None:
        if state.step % self.cfg.every and not state.at_end:
            return
        alpha = lookahead_alpha(state.progress, decay=self.cfg.decay, every=self.cfg.every)
        lookahead_step(self.slow, _averaged_tensors(state.model), alpha)
