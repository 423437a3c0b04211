"""What a trial scores, and when a running trial is stopped early (pruned).

**Objective** (minimized): a trial that reaches the target on the validation split scores its
time-to-target in seconds. A trial that misses scores

    penalty = MISS_FLOOR_S * (1 + (target - best) / target)

where ``best`` is its best validation accuracy (clipped to [0, target]): 10^6 s for a miss by a hair,
up to 2 * 10^6 s for one that learned nothing. A trial's time is capped far below 10^6 s (11.6 days;
``--trial-budget`` is refused above 10^5 s), so every miss ranks after every hit, and misses rank by
how far they fell short. Diverged and failed trials score ``WORST_S`` = 3 * 10^6 s: last.

**Pruning** (``prune_reason``, the rule of ``TimeToAccuracyPruner``). The reference is the study's
best finished trial (the fastest that reached the target), its time ``best_s`` and its validation
curve. A running trial is stopped when

1. *it is slower*: its elapsed time passes ``slack * best_s`` (default 1.25), or its next evaluation,
   the first moment it could reach the target, is predicted (from its recent steps' pace) to come
   after that: it can no longer be among the fastest, whatever it reaches; or
2. *it is behind*: at one of its evaluations, its validation accuracy is more than ``margin``
   (default 0.01, one point) below the best the reference had reached at the same elapsed time.

Before any trial has reached the target nothing is pruned. Pruned trials keep their run in the
run store (outcome ``pruned``) and their curve in the study.
"""
from __future__ import annotations

import bisect
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from optuna.pruners import BasePruner
from optuna.trial import TrialState

from speedrun.config import ConfigError

MISS_FLOOR_S = 1e6
WORST_S = 3 * MISS_FLOOR_S
MAX_TRIAL_BUDGET_S = 1e5  # well below MISS_FLOOR_S: every hit ranks before every miss
MISSES = ("budget_exhausted",)  # outcomes scored by the penalty; diverged/failed score WORST_S


def objective_value(outcome: str, *, time_s: float | None, best_accuracy: float | None, target: float) -> float:
    """The score of a finished trial (lower is better); see the module docstring.

    >>> objective_value("reached", time_s=25.0, best_accuracy=0.921, target=0.92)
    25.0
    >>> objective_value("budget_exhausted", time_s=None, best_accuracy=0.46, target=0.92)
    1500000.0
    """
    if outcome == "reached" and time_s is not None:
        return float(time_s)
    if outcome in MISSES:
        best = min(max(best_accuracy or 0.0, 0.0), target)
        return MISS_FLOOR_S * (1 + (target - best) / target)
    return WORST_S


def is_hit(value: float | None) -> bool:
    return value is not None and value < MISS_FLOOR_S


@dataclass(frozen=True)
class PruneRule:
    """The pruning rule's two numbers (module docstring)."""

    slack: float = 1.25  # a trial past slack x the best time cannot be among the fastest
    margin: float = 0.01  # accuracy below the reference's at the same elapsed time that counts as behind

    def __post_init__(self) -> None:
        if not (self.slack >= 1 and math.isfinite(self.slack)):
            raise ConfigError(f"--prune-slack must be >= 1; got {self.slack}")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"--prune-margin must be in [0, 1); got {self.margin}")


def reference_accuracy(reference: Sequence[tuple[float, float]], elapsed_s: float) -> float | None:
    """The best accuracy the reference curve ``[(elapsed_s, accuracy), ...]`` (sorted) had reached by
    ``elapsed_s``; None before its first point."""
    k = bisect.bisect_right([t for t, _ in reference], elapsed_s)
    return max((a for _, a in reference[:k]), default=None)


def prune_reason(curve: Sequence[tuple[float, float]], *, elapsed_s: float, next_eval_s: float | None,
                 best_s: float | None, reference: Sequence[tuple[float, float]], rule: PruneRule) -> str | None:
    """Why a running trial should stop now, or None. ``curve``: its (elapsed s, validation accuracy)
    points so far; ``next_eval_s``: when its next evaluation is predicted; ``best_s`` and
    ``reference``: the best finished trial's time and curve (None and [] before any reached)."""
    if best_s is None:
        return None
    limit = rule.slack * best_s
    if elapsed_s > limit:
        return f"{elapsed_s:.1f} s elapsed, past {rule.slack:g}x the best trial's {best_s:.1f} s"
    if next_eval_s is not None and next_eval_s > limit:
        return (f"its next evaluation would come at ~{next_eval_s:.1f} s, past {rule.slack:g}x the best "
                f"trial's {best_s:.1f} s")
    if curve:
        t, accuracy = curve[-1]
        ref = reference_accuracy(reference, t)
        if ref is not None and accuracy < ref - rule.margin:
            return (f"{accuracy:.2%} at {t:.1f} s, more than {rule.margin:.1%} below the best trial's "
                    f"{ref:.2%} by then")
    return None


def _curve(trial) -> list[tuple[float, float]]:
    """A trial's validation curve from its intermediate values (step = elapsed milliseconds)."""
    return [(step / 1000, value) for step, value in sorted(trial.intermediate_values.items())]


def best_finished(study) -> Any | None:
    """The study's fastest trial that reached the target (a FrozenTrial), or None."""
    hits = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if is_hit(t.value)]
    return min(hits, key=lambda t: t.value, default=None)


class TimeToAccuracyPruner(BasePruner):
    """``prune_reason`` as an Optuna pruner: ``trial.should_prune()`` after each ``trial.report``
    (value: validation accuracy, step: elapsed milliseconds). The trial notes its pace first
    (``note_pace``), so the time rule sees its predicted next evaluation too."""

    def __init__(self, rule: PruneRule = PruneRule()) -> None:
        self.rule = rule
        self.reason: str | None = None
        self.elapsed_s: float = 0.0
        self.next_eval_s: float | None = None

    def note_pace(self, *, elapsed_s: float, next_eval_s: float | None) -> None:
        self.elapsed_s, self.next_eval_s = elapsed_s, next_eval_s

    def prune(self, study, trial) -> bool:
        best = best_finished(study)
        curve = _curve(trial)
        elapsed = max(self.elapsed_s, curve[-1][0] if curve else 0.0)
        self.reason = prune_reason(curve, elapsed_s=elapsed, next_eval_s=self.next_eval_s,
                                   best_s=None if best is None else best.value,
                                   reference=[] if best is None else _curve(best), rule=self.rule)
        return self.reason is not None


class TrialHook:
    """The fit hook of a trial: reports each validation point to the study and stops the fit
    (``StopFit("pruned", why)``) when the pruner says so, when its time check says so between
    evaluations, or when the study's search time is over. It also marks the trial alive every
    ``ALIVE_EVERY_S`` (a trial whose worker stopped marking it is failed on resume).

    Between evaluations the time rule needs the best time only: it is read from the study every
    ``REFRESH_S`` seconds (other workers may finish faster trials meanwhile).
    """

    REFRESH_S, ALIVE_EVERY_S, PACE_WINDOW = 5.0, 30.0, 8

    def __init__(self, trial, pruner: TimeToAccuracyPruner | None, *, recipe, search_deadline: float | None,
                 clock_now: Callable[[], float] = time.time) -> None:
        self.trial, self.pruner, self.recipe = trial, pruner, recipe
        self.search_deadline, self.now = search_deadline, clock_now
        self._seen = None
        self._best_s: float | None = None
        self._best_read_at = -math.inf
        self._alive_at = -math.inf
        self._steps: list[tuple[float, float]] = []  # (schedule step, train seconds) recent
        self.overhead_s = 0.0  # time spent in this hook's study reads and writes

    def _next_eval_step(self, state) -> float:
        """The schedule step of the trial's next evaluation (Evaluator's cadence)."""
        ev = self.recipe.eval
        start = math.ceil(ev.start_frac * state.schedule_steps)
        every = max(1, round(ev.every_epochs * state.steps_per_epoch)) if ev.every_epochs else 0
        step = state.schedule_step
        nxt = float(state.max_steps)
        if every:
            k = max(step, start - 1) // every + 1
            nxt = min(nxt, max(k * every, start))
        return nxt

    def before_batch(self, state) -> None:
        from speedrun.train.loop import StopFit

        clock = state.extras.get("clock")
        if clock is None:
            return
        t0 = time.perf_counter()
        elapsed = clock.elapsed(sync=False)
        if self.search_deadline is not None and self.now() > self.search_deadline:
            raise StopFit("pruned", "the study's time budget ended")
        train_s = elapsed - clock.eval_s
        self._steps.append((state.schedule_step, train_s))
        del self._steps[:-self.PACE_WINDOW]
        next_eval_s = None
        if len(self._steps) >= self.PACE_WINDOW and state.schedule_step >= 0.1 * state.schedule_steps:
            (s0, t_0), (s1, t_1) = self._steps[0], self._steps[-1]
            if s1 > s0:
                next_eval_s = elapsed + (self._next_eval_step(state) - s1) * (t_1 - t_0) / (s1 - s0)
        now = self.now()
        if now - self._alive_at >= self.ALIVE_EVERY_S:
            self.trial.set_user_attr("alive_at", now)
            self._alive_at = now
        if self.pruner is None:
            self.overhead_s += time.perf_counter() - t0
            return
        point = state.extras.get("last_point")
        reason = None
        if point is not None and point is not self._seen:  # a new evaluation: report it, ask the pruner
            self._seen = point
            self.trial.report(point.accuracy, step=int(round(point.elapsed_s * 1000)))
            self.pruner.note_pace(elapsed_s=elapsed, next_eval_s=next_eval_s)
            if self.trial.should_prune():
                reason = self.pruner.reason
        else:  # between evaluations: only the time rule, against the best time read now and then
            if now - self._best_read_at >= self.REFRESH_S:
                best = best_finished(self.trial.study)
                self._best_s = None if best is None else best.value
                self._best_read_at = now
            reason = prune_reason([], elapsed_s=elapsed, next_eval_s=next_eval_s, best_s=self._best_s,
                                  reference=[], rule=self.pruner.rule)
        self.overhead_s += time.perf_counter() - t0
        if reason:
            raise StopFit("pruned", reason)


def worker_id() -> dict[str, Any]:
    """Who runs a trial: a trial whose worker is gone is failed on resume (``storage.fail_dead_trials``)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}
