"""Weight averaging: Lookahead-style (Zhang et al. 2019; airbench's scheduled variant) and a
bias-corrected exponential moving average (Polyak & Juditsky 1992; the EMA of EfficientNet and timm)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from speedrun.config import AverageConfig
from speedrun.train.distributed import plain_module


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

    def state_dict(self) -> dict:
        return {"slow": self.slow}

    @torch.no_grad()
    def load_state_dict(self, saved: dict, state) -> None:
        for s, t in zip(self.slow, saved["slow"], strict=True):
            s.copy_(t)

    def after_step(self, state) -> None:
        if state.step % self.cfg.every and not state.at_end:
            return
        alpha = lookahead_alpha(state.progress, decay=self.cfg.decay, every=self.cfg.every)
        lookahead_step(self.slow, _averaged_tensors(state.model), alpha)


@torch.no_grad()
def ema_update(avg: Sequence[Tensor], params: Sequence[Tensor], decay: float) -> None:
    """``avg <- decay * avg + (1 - decay) * params`` (in place)."""
    for a, p in zip(avg, params):
        a.lerp_(p, 1.0 - decay)


def bias_corrected_decay(decay: float, remaining: float) -> float:
    """The decay for the next update of an average that must not remember its starting value.

    ``remaining`` is the product of the decays of all earlier updates (1 before the first). An EMA
    started from zeros and divided by ``1 - remaining`` (Adam's bias correction) is a weighted mean of
    the weights seen so far; updating the corrected average directly with this decay gives the same
    mean, so the first update replaces the initial weights and early averages are not held at init.

    >>> bias_corrected_decay(0.9, 1.0), round(bias_corrected_decay(0.9, 0.9), 4)
    (0.0, 0.4737)
    """
    return decay * (1.0 - remaining) / (1.0 - decay * remaining)


class EMA:
    """Keeps a bias-corrected EMA of the weights in a copy of the model, which evaluations use.

    Every ``every`` steps (and at the last step) the copy moves toward the live weights with decay
    ``decay**steps``, ``steps`` counted since its previous update, so the average is that of a
    per-step EMA whatever the cadence. The copy is handed to the evaluator as ``state.eval_model``
    (listed after the evaluator, this hook's ``after_step`` runs first); at the end of the fit the
    average is copied into the live model, so the trained model returned is the one evaluated.

    BatchNorm running statistics are copied from the live model, not averaged: an average of running
    averages lags twice, and neither describes the averaged weights exactly; the live statistics are
    the most recent estimate, and late in training, where the average pays off, the averaged weights
    are close to the live ones. Recomputing the statistics for the averaged weights (SWA's
    ``update_bn``) would cost a pass over training data at every evaluation.
    """

    def __init__(self, cfg: AverageConfig) -> None:
        self.cfg = cfg
        self.averaged: nn.Module | None = None
        self.remaining = 1.0
        self.last_step = 0

    def before_fit(self, state) -> None:
        self.live = plain_module(state.model)  # under the torch.compile wrapper and DistributedDataParallel
        self.averaged = copy.deepcopy(self.live).requires_grad_(False)
        self._pairs = [(a, p) for a, p in zip(self.averaged.parameters(), self.live.parameters())]
        self._buffers = list(zip(self.averaged.buffers(), self.live.buffers()))
        self.remaining, self.last_step = 1.0, state.step

    def state_dict(self) -> dict:
        return {"averaged": self.averaged.state_dict(), "remaining": self.remaining, "last_step": self.last_step}

    def load_state_dict(self, saved: dict, state) -> None:
        self.averaged.load_state_dict(saved["averaged"])
        self.remaining, self.last_step = saved["remaining"], saved["last_step"]
        if self.remaining < 1.0:  # updated before the checkpoint: evaluations use the average
            state.eval_model = self.averaged

    @torch.no_grad()
    def after_step(self, state) -> None:
        if state.step % self.cfg.every and state.step < state.max_steps:
            return
        decay = self.cfg.decay ** (state.step - self.last_step)
        ema_update([a for a, _ in self._pairs], [p for _, p in self._pairs],
                   bias_corrected_decay(decay, self.remaining))
        self.remaining *= decay
        self.last_step = state.step
        for a, b in self._buffers:
            a.copy_(b)
        state.eval_model = self.averaged

    @torch.no_grad()
    def after_fit(self, state) -> None:
        if self.remaining < 1.0:  # at least one update
            for a, p in self._pairs:
                p.copy_(a)
