"""The LR range test (Smith 2017, "Cyclical learning rates", section 3.3; fastai's ``lr_find``).

Train a fresh copy of a recipe's model for a few steps while the LR grows exponentially from
``start_lr`` to ``end_lr``, record the loss of each step, smooth it, and stop once it diverges.

The suggestion follows the recipe's schedule. A schedule that warms up to a peak and anneals
(``one-cycle``, ``cosine``) spends little time at its peak: its peak can sit near the LR where the
smoothed loss is lowest (Smith: the largest LR at which the loss still falls). A constant or
step-decayed LR trains at its value throughout: the LR where the loss falls fastest (the steepest
descent) suits it. On the fashion-mnist recipe (one-cycle) the steepest descent, 0.076, missed 92% (issue 22);
the minimum, 2.16 (Muon's LR scaled with it), reached 92.5% (seed 0, full dataset).

Everything the recipe says about the step is kept: model, optimizer (momentum, Nesterov, weight
decay and its exemptions), batch size, augmentation, label smoothing, precision. Not used: the
LR schedule (replaced by the sweep), momentum cycling, weight averaging, progressive resizing,
evaluation and ``train.compile`` (compiling changes speed, not the curve). The model, optimizer
and RNG state are made and dropped inside :func:`lr_find`; nothing reaches a later run.

>>> r = lr_find("fashion-mnist", steps=100)  # doctest: +SKIP
>>> r.suggested_lr, r.suggested_optim_lr  # doctest: +SKIP
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from speedrun.config import ConfigError, Recipe
from speedrun.techniques.large_batch import linear_scaled_lr
from speedrun.train.loop import FitState, StopFit, fit

PEAKED_SCHEDULES = ("one-cycle", "cosine")  # warm up to a peak LR, then anneal: suggest near the loss minimum


def lr_sequence(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """``steps`` LRs growing geometrically from ``start_lr`` to ``end_lr``, both included.

    >>> lr_sequence(1e-3, 1e-1, 3)
    [0.001, 0.01, 0.1]
    """
    if not (steps >= 2 and 0 < start_lr < end_lr):
        raise ValueError(f"need steps >= 2 and 0 < start_lr < end_lr; got {steps}, {start_lr:g}, {end_lr:g}")
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def smooth_losses(losses: Sequence[float], *, beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (as Adam's moments): the i-th value (from 1) is
    ``avg_i / (1 - beta**i)`` with ``avg_i = beta * avg_{i-1} + (1 - beta) * loss_i``, ``avg_0 = 0``.

    Without the correction the first values would be pulled toward 0. The average lags the raw
    loss (see :func:`ema_centres`), so it is plotted and searched at the LRs it stands for.

    >>> smooth_losses([2.0, 1.0], beta=0.5)  # [1/0.5, (0.5 + 0.5)/0.75]
    [2.0, 1.3333333333333333]
    """
    avg, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def ema_centres(n: int, *, beta: float) -> list[float]:
    """The step each of the first ``n`` bias-corrected averages is centred on (0-based, fractional).

    Average ``i`` weighs the loss of step ``i - k`` by ``beta**k`` (k = 0..i, normalised), so its
    centre is ``i - sum(k * beta**k) / sum(beta**k)``; where the loss changes linearly with the step
    the average equals the raw loss there, exactly. This matters: fastai's beta = 0.98 lags ~49 steps
    at steady state; on the fashion-mnist recipe's 100-step sweep over 6 decades of LR, even beta = 0.9
    read at the current step put the minimum at LR 4.5, where the raw loss was already rising, against
    1.05 read at the centre.

    >>> ema_centres(3, beta=0.5)  # 0; 1 - 0.5/1.5; 2 - (0.5 + 0.5)/1.75
    [0.0, 0.6666666666666667, 1.4285714285714286]
    """
    out, s0, s1 = [], 0.0, 0.0
    for i in range(n):
        s0, s1 = s0 + beta**i, s1 + i * beta**i
        out.append(i - s1 / s0)
    return out


def lrs_at(lrs: Sequence[float], steps: Sequence[float]) -> list[float]:
    """The LR at fractional ``steps`` of the sweep ``lrs``, interpolating log-linearly between steps.

    >>> [round(lr, 9) for lr in lrs_at([1.0, 100.0, 1e4], [0.5, 2.0])]
    [10.0, 10000.0]
    """
    out = []
    for c in steps:
        i = min(int(c), len(lrs) - 2) if len(lrs) > 1 else 0
        frac = c - i
        out.append(lrs[i] if frac == 0 else math.exp((1 - frac) * math.log(lrs[i]) + frac * math.log(lrs[i + 1])))
    return out


def default_beta(steps: int) -> float:
    """A smoothing window of about a tenth of the sweep: ``1 - 10 / steps`` (0.9 at 100 steps, 0.98 at 500)."""
    return max(0.0, 1.0 - 10.0 / steps)


@dataclass(frozen=True)
class Suggestion:
    """Where the smoothed loss falls fastest, and where it is lowest (None where undefined).

    ``steepest_lr`` (fastai's ``steep``): the LR at the left end of the steepest downward segment of
    the smoothed loss against log(LR), searched only before the minimum (past it the loss rises into
    divergence). ``min_loss_lr / 10`` is the other common rule (fastai's ``minimum``). Both aim at a
    good constant LR; the peak of a one-cycle schedule sits higher, toward ``min_loss_lr`` itself
    (Smith: the largest LR at which the loss still falls). :attr:`LRFindResult.suggested_lr` picks
    by the recipe's schedule.
    """

    steepest_lr: float | None
    min_loss_lr: float | None

    @property
    def min_loss_lr_div10(self) -> float | None:
        return None if self.min_loss_lr is None else self.min_loss_lr / 10


def suggest_lr(lrs: Sequence[float], smoothed: Sequence[float], *, skip_start: int = 0) -> Suggestion:
    """Both suggestions from a smoothed curve, ignoring the first ``skip_start`` points (a bias-corrected
    average of few losses is noisy). The gradient of segment i is
    ``(smoothed[i+1] - smoothed[i]) / (ln lrs[i+1] - ln lrs[i])``.

    >>> s = suggest_lr([1, 10, 100, 1000, 10000], [5.0, 4.9, 3.0, 2.5, 2.6])
    >>> s.steepest_lr, s.min_loss_lr
    (10, 1000)
    """
    if len(lrs) != len(smoothed):
        raise ValueError(f"{len(lrs)} LRs but {len(smoothed)} losses")
    window = [i for i in range(skip_start, len(smoothed)) if math.isfinite(smoothed[i])]
    if not window:
        return Suggestion(None, None)
    lowest = min(window, key=lambda i: smoothed[i])
    slopes = {i: (smoothed[i + 1] - smoothed[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
              for i in range(window[0], lowest)}
    slopes = {i: g for i, g in slopes.items() if math.isfinite(g)}
    steepest = min(slopes, key=slopes.get) if slopes and min(slopes.values()) < 0 else None
    return Suggestion(None if steepest is None else lrs[steepest], lrs[lowest])


def check_range(*, start_lr: float, end_lr: float, steps: int, beta: float | None = None,
                diverge_factor: float = 4.0) -> None:
    """One-line ConfigErrors for a sweep no test could use."""
    checks = [
        (steps >= 10, f"--steps must be >= 10 to give a curve; got {steps}"),
        (start_lr > 0 and math.isfinite(start_lr), f"--start-lr must be > 0; got {start_lr:g}"),
        (end_lr > start_lr and math.isfinite(end_lr),
         f"--end-lr must be greater than --start-lr; got {start_lr:g} -> {end_lr:g}"),
        (beta is None or 0 <= beta < 1, f"--smoothing must be in [0, 1); got {beta}"),
        (diverge_factor > 1, f"--diverge-factor must be > 1; got {diverge_factor:g}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


class RangeTest:
    """The hook: sets step i's LR to ``lrs[i]`` in every param group, records each loss, and stops the fit
    as ``diverged`` when the loss is not finite or the smoothed loss exceeds ``diverge_factor`` x its best.

    With ``reference_lr`` (the recipe's peak LR), a group whose ``peak_lr`` differs from it keeps its
    ratio to it — BatchNorm biases at ``optim.bias_lr_scale``, Muon's filters at ``optim.muon_lr`` —
    so the sweep scales all of the recipe's LRs together and the suggestion is for ``optim.lr``
    with those ratios held.
    """

    def __init__(self, lrs: Sequence[float], *, beta: float, diverge_factor: float = 4.0,
                 reference_lr: float | None = None) -> None:
        self.lrs, self.beta, self.diverge_factor = list(lrs), beta, diverge_factor
        self.reference_lr = reference_lr
        self.losses: list[float] = []
        self._best = math.inf

    def before_batch(self, state: FitState) -> None:
        for group in state.optimizer.param_groups:
            ratio = group["peak_lr"] / self.reference_lr if self.reference_lr and "peak_lr" in group else 1.0
            group["lr"] = self.lrs[state.step] * ratio

    def after_loss(self, state: FitState) -> None:
        loss = float(state.loss.detach())
        self.losses.append(loss)
        lr = self.lrs[state.step]
        if not math.isfinite(loss):
            raise StopFit("diverged", f"loss became {loss} at step {state.step} (LR {lr:.3g})")
        smoothed = smooth_losses(self.losses, beta=self.beta)[-1]
        self._best = min(self._best, smoothed)
        if smoothed > self.diverge_factor * self._best:
            raise StopFit("diverged", f"smoothed loss {smoothed:.3g} > {self.diverge_factor:g} x its best "
                                      f"{self._best:.3g} at step {state.step} (LR {lr:.3g})")


@dataclass
class LRFindResult:
    """A finished range test. LRs are absolute (per step at ``batch_size``); ``to_optim_lr`` converts one
    to the recipe's unit, ``optim.lr`` per ``optim.lr_batch_size`` examples."""

    recipe: str
    batch_size: int
    lr_batch_size: int
    recipe_optim_lr: float  # the recipe's own optim.lr, for comparison
    lrs: list[float]  # the LR of each step run
    losses: list[float]  # the loss of each step run
    smoothed: list[float]  # bias-corrected moving average of ``losses``
    smoothed_lrs: list[float]  # the LR each smoothed value is centred on (see ema_centres)
    beta: float
    outcome: str  # completed | diverged | interrupted
    detail: str
    steps_planned: int
    skip_start: int  # suggestions ignore the first this many points
    suggestion: Suggestion
    seconds: float
    device: str
    precision: str
    torch_version: str
    env: dict = field(default_factory=dict)
    schedule: str = "constant"  # the recipe's schedule.kind: which suggestion fits it (see PEAKED_SCHEDULES)
    recipe_muon_lr: float | None = None  # optim.muon_lr when the recipe trains with Muon: swept with optim.lr

    @property
    def method(self) -> str:
        """``min_loss`` for a schedule that peaks and anneals, ``steepest`` for a constant or decaying one."""
        return "min_loss" if self.schedule in PEAKED_SCHEDULES else "steepest"

    @property
    def min_at_end(self) -> bool:
        """The smoothed loss was lowest at the last LR of a sweep that did not diverge: still falling."""
        lowest = self.suggestion.min_loss_lr
        return self.outcome == "completed" and lowest is not None and lowest == self.smoothed_lrs[-1]

    def to_optim_lr(self, lr: float | None) -> float | None:
        """An absolute LR in the recipe's unit: the ``optim.lr`` that gives ``lr`` at ``batch_size``."""
        return None if lr is None else lr * self.lr_batch_size / self.batch_size

    @property
    def recipe_lr(self) -> float:
        """The recipe's peak LR, absolute."""
        return self.recipe_optim_lr * self.batch_size / self.lr_batch_size

    @property
    def suggested_lr(self) -> float | None:
        s = self.suggestion
        if self.method == "steepest" or s.steepest_lr is None:  # a loss that never fell has no valley
            return s.steepest_lr
        return s.min_loss_lr

    @property
    def suggested_optim_lr(self) -> float | None:
        return self.to_optim_lr(self.suggested_lr)

    def suggested_sets(self) -> dict[str, float]:
        """The ``--set`` values that train at the suggested LR: ``optim.lr``, and ``optim.muon_lr`` at
        its ratio to it in the recipe (the sweep kept every group's ratio to the recipe's LR)."""
        lr = self.suggested_optim_lr
        if lr is None:
            return {}
        sets = {"optim.lr": lr}
        if self.recipe_muon_lr is not None:
            sets["optim.muon_lr"] = self.recipe_muon_lr * lr / self.recipe_optim_lr
        return sets

    def to_dict(self) -> dict[str, Any]:
        s = self.suggestion
        method = ("the smoothed loss's minimum (the schedule peaks and anneals)" if self.method == "min_loss" else
                  "steepest descent of the smoothed loss against log(LR), before its minimum (a constant or "
                  "decaying schedule)")
        return {**asdict(self), "suggestion": {
            "method": method, "schedule": self.schedule, "min_at_end": self.min_at_end,
            "lr": self.suggested_lr, "optim_lr": self.suggested_optim_lr, "sets": self.suggested_sets(),
            "steepest_lr": s.steepest_lr, "steepest_optim_lr": self.to_optim_lr(s.steepest_lr),
            "min_loss_lr": s.min_loss_lr, "min_loss_optim_lr": self.to_optim_lr(s.min_loss_lr),
            "min_loss_lr_div10": s.min_loss_lr_div10, "min_loss_div10_optim_lr": self.to_optim_lr(s.min_loss_lr_div10)}}


def lr_find(recipe: str | Path | Recipe = "fashion-mnist", *, data: str | Path | None = None, seed: int = 0,
            device: str = "auto", threads: int | None = None, steps: int = 100, start_lr: float = 1e-5,
            end_lr: float = 10.0, beta: float | None = None, diverge_factor: float = 4.0,
            overrides: Mapping[str, Any] | None = None) -> LRFindResult:
    """Run the LR range test on ``recipe`` (a name, a .toml path or a Recipe) and suggest a peak LR.

    ``start_lr`` and ``end_lr`` are absolute LRs at the recipe's batch size; ``beta`` (the smoothing)
    defaults to :func:`default_beta`. The thread count and the global RNG are restored, and the model
    and optimizer dropped, before this returns.
    """
    from speedrun import data as datalib
    from speedrun.env import environment
    from speedrun.env import resolve_precision
    from speedrun.train.run import build_parts, resolve_device, resolve_recipe

    check_range(start_lr=start_lr, end_lr=end_lr, steps=steps, beta=beta, diverge_factor=diverge_factor)
    beta = default_beta(steps) if beta is None else beta
    values = dict(overrides or {})
    if data is not None:
        values["data.source"] = str(data)
    recipe = resolve_recipe(recipe).override({**values, "train.compile": False})
    dev = resolve_device(device)
    precision = resolve_precision(recipe.train.precision, dev)
    if threads is not None and threads < 1:
        raise ConfigError("--threads must be >= 1")
    directory = datalib.prepare(datalib.resolve(recipe.data.source)).directory

    lrs = lr_sequence(start_lr, end_lr, steps)
    test = RangeTest(lrs, beta=beta, diverge_factor=diverge_factor,
                     reference_lr=linear_scaled_lr(recipe.optim.lr, batch_size=recipe.train.batch_size,
                                                   reference_batch_size=recipe.optim.lr_batch_size))
    saved_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        env = {**environment(dev), "precision": precision}
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            parts = build_parts(recipe, directory, dev, precision, seed)
            state = fit(FitState(model=parts.net, optimizer=parts.optimizer, autocast=parts.autocast,
                                 grad_scaler=parts.grad_scaler, loss_fn=parts.loss_fn, loader=parts.train_loader,
                                 schedule_steps=steps, max_steps=steps), [test])
    finally:
        torch.set_num_threads(saved_threads)
    seconds = time.perf_counter() - t0

    tried = lrs[:len(test.losses)]
    smoothed = smooth_losses(test.losses, beta=beta)
    smoothed_lrs = lrs_at(lrs, ema_centres(len(smoothed), beta=beta))
    skip = steps // 10
    detail = state.detail or ("all steps run without divergence; a higher --end-lr would show where the loss "
                              "turns up" if state.outcome == "completed" else "")
    return LRFindResult(
        recipe=recipe.name, batch_size=recipe.train.batch_size, lr_batch_size=recipe.optim.lr_batch_size,
        recipe_optim_lr=recipe.optim.lr, lrs=tried, losses=test.losses, smoothed=smoothed,
        smoothed_lrs=smoothed_lrs, beta=beta, outcome=state.outcome, detail=detail, steps_planned=steps,
        skip_start=skip, suggestion=suggest_lr(smoothed_lrs, smoothed, skip_start=skip), seconds=seconds,
        device=env["device_name"], precision=precision, torch_version=torch.__version__, env=env,
        schedule=recipe.schedule.kind, recipe_muon_lr=recipe.optim.muon_lr if recipe.optim.name == "muon" else None)


def plot_png(result: LRFindResult) -> bytes:
    """Raw and smoothed loss against the LR (log axis; the recipe's ``optim.lr`` unit on top), with the
    suggestions and the recipe's own LR marked. Drawn on matplotlib's Agg canvas: no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.84, bottom=0.12)
    ax = fig.add_subplot()
    raw = [(lr, loss) for lr, loss in zip(result.lrs, result.losses) if math.isfinite(loss)]
    if raw:
        ax.plot(*zip(*raw), ".", color="0.6", ms=3, label="loss per step")
    ax.plot(result.smoothed_lrs, result.smoothed, color="C0", lw=1.8,
            label=f"smoothed (beta {result.beta:g}, at its centre LR)")
    s = result.suggestion
    chosen = " (suggested)"
    marks = [(s.steepest_lr, "C3", "steepest descent" + chosen * (result.method == "steepest")),
             (s.min_loss_lr_div10, "C2", "min loss / 10"),
             (s.min_loss_lr, "C1", "min loss" + chosen * (result.method == "min_loss")),
             (result.recipe_lr, "0.3", "recipe's LR")]
    for lr, color, label in marks:
        if lr is not None:
            ax.axvline(lr, color=color, ls="--", lw=1, label=f"{label}: {lr:.3g}")
    ax.set_xscale("log")
    # Scale to the curve after the skipped start, up to a little above where it began: the divergence
    # tail and its huge raw losses would flatten everything else.
    shown = [v for _, v in raw[result.skip_start:]] + result.smoothed[result.skip_start:]
    shown = [v for v in shown if math.isfinite(v)]
    if shown:
        low, high = min(shown), min(max(shown), 1.5 * result.smoothed[0])
        pad = 0.05 * (high - low) + 1e-6
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(f"LR per step (batch {result.batch_size})")
    ax.set_ylabel("training loss")
    scale = result.lr_batch_size / result.batch_size
    top = ax.secondary_xaxis("top", functions=(lambda x: x * scale, lambda x: x / scale))
    top.set_xlabel(f"optim.lr (per {result.lr_batch_size} examples)")
    ax.set_title(f"LR range test: {result.recipe}, {len(result.lrs)} steps, {result.outcome}", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3, which="both")
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()
