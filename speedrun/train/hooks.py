"""The trainer's own hooks: evaluation against the target, budgets, divergence, progress display."""
from __future__ import annotations

import contextlib
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from speedrun.measure.clock import Clock
from speedrun.techniques.tta import tta_logits
from speedrun.train import distributed
from speedrun.train.loop import FitState, StopFit


@dataclass(frozen=True)
class EvalPoint:
    elapsed_s: float
    epoch: float
    step: int
    accuracy: float
    test_loss: float
    train_loss: float | None  # mean training loss since the previous evaluation


@torch.inference_mode()
def evaluate(model: nn.Module, loader, *, tta_flip: bool = False, tta_translate_px: int = 0,
             autocast=contextlib.nullcontext) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over ``loader``; with test-time augmentation, the logits are
    averaged over mirrored (``tta_flip``) and shifted (``tta_translate_px``) copies of each image.

    A loader sharded over the ranks of a job (``world_size > 1``) serves each rank its share of the split
    (the last shards may be short or empty); the counts and loss sums are all-reduced, so every rank
    returns the whole split's figures, of rank 0's model (its buffers broadcast first).
    """
    sharded = getattr(loader, "world_size", 1) > 1
    model = distributed.local_module(model)  # DDP's forward would start collectives the shards cannot match
    if sharded:
        distributed.sync_buffers(model)
    was_training = model.training
    model.eval()
    correct, loss_sum, count = 0, 0.0, 0
    for x, y in loader.epoch(0):
        with autocast():
            logits = tta_logits(model, x, flip=tta_flip, translate_px=tta_translate_px)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        count += len(y)
    model.train(was_training)
    if sharded:
        correct, loss_sum, count = distributed.all_reduce_sums([correct, loss_sum, count])
    return correct / count, loss_sum / count


class Evaluator:
    """Evaluates on the cadence of the recipe and stops the fit at the first accuracy >= target.

    Cadence: every ``every_steps`` steps and/or every ``every_s`` seconds, never before
    ``start_step``, and always at the last step. Evaluation time is tallied by the clock.
    ``on_point`` is called with each point as it is measured (the run store records it there, so a
    killed run keeps its curve); its time is tallied as evaluation time, after the point's clock read.
    """

    def __init__(self, loader, *, clock: Clock, target: float | None, every_steps: int = 0,
                 every_s: float = 0.0, start_step: int = 0, tta_flip: bool = False,
                 tta_translate_px: int = 0, on_point: Callable[[EvalPoint], None] | None = None,
                 agree: Callable[[bool], bool] | None = None) -> None:
        self.loader, self.clock, self.target, self.on_point = loader, clock, target, on_point
        self.agree = agree  # in a job, rank 0's decision to evaluate on its clock (every_s), for every rank
        self.every_steps, self.every_s, self.start_step = every_steps, every_s, start_step
        self.tta_flip, self.tta_translate_px = tta_flip, tta_translate_px
        self.curve: list[EvalPoint] = []
        self.best_accuracy = 0.0
        self.reached_at: float | None = None  # elapsed seconds when the target was first seen
        self._last_eval_s = 0.0
        self._last_step = 0.0  # schedule step of the previous after_step
        self._loss_sum: Tensor | float = 0.0
        self._loss_count = 0

    def before_fit(self, state: FitState) -> None:
        self._last_step = state.schedule_step
        state.extras["clock"] = self.clock  # the run's clock, for hooks that judge elapsed time (speedrun tune)

    def state_dict(self) -> dict:
        return {"curve": [asdict(p) for p in self.curve], "best_accuracy": self.best_accuracy,
                "last_eval_s": self._last_eval_s, "last_step": self._last_step, "loss_sum": self._loss_sum,
                "loss_count": self._loss_count}

    def load_state_dict(self, saved: dict, state: FitState) -> None:
        self.curve = [EvalPoint(**p) for p in saved["curve"]]
        self.best_accuracy, self._last_eval_s = saved["best_accuracy"], saved["last_eval_s"]
        self._last_step, self._loss_sum, self._loss_count = saved["last_step"], saved["loss_sum"], saved["loss_count"]
        if self.curve:
            state.extras["last_accuracy"] = self.curve[-1].accuracy

    def after_loss(self, state: FitState) -> None:
        self._loss_sum = self._loss_sum + state.loss.detach().float()  # no device sync
        self._loss_count += 1

    def after_step(self, state: FitState) -> None:
        # Schedule steps, not optimizer steps: with batch scaling one step may span several.
        step, last = state.schedule_step, self._last_step
        self._last_step = step
        if step < self.start_step and not state.at_end:
            return
        due = state.at_end
        if self.every_steps and step // self.every_steps > last // self.every_steps:
            due = True
        if self.every_s and self.clock.elapsed(sync=False) - self._last_eval_s >= self.every_s:
            due = True
        if self.every_s and self.agree is not None:
            due = self.agree(due)
        if due:
            self.run(state)

    def run(self, state: FitState) -> EvalPoint:
        with self.clock.evaluating():
            model = state.model if state.eval_model is None else state.eval_model
            accuracy, test_loss = evaluate(model, self.loader, tta_flip=self.tta_flip,
                                           tta_translate_px=self.tta_translate_px, autocast=state.autocast)
        elapsed = self.clock.elapsed()
        self._last_eval_s = elapsed
        train_loss = float(self._loss_sum) / self._loss_count if self._loss_count else None
        self._loss_sum, self._loss_count = 0.0, 0
        point = EvalPoint(elapsed, state.epoch_float, state.step, accuracy, test_loss, train_loss)
        self.curve.append(point)
        if self.on_point is not None:
            with self.clock.evaluating():
                self.on_point(point)
        self.best_accuracy = max(self.best_accuracy, accuracy)
        state.extras["last_accuracy"] = accuracy
        state.extras["last_point"] = point
        if self.target is not None and accuracy >= self.target:
            self.reached_at = elapsed
            raise StopFit("reached", f"{accuracy:.2%} >= {self.target:.2%} at epoch {state.epoch_float:.2f}")
        return point


class DivergenceGuard:
    """Stops the fit as ``diverged`` when the loss is NaN or infinite.

    Checking reads the loss back from the device; on CUDA it is done every ``every`` steps so
    the GPU queue is not drained at every step.
    """

    def __init__(self, every: int = 1) -> None:
        self.every = every

    def after_loss(self, state: FitState) -> None:
        if state.step % self.every == 0:
            value = float(state.loss.detach())
            if not math.isfinite(value):
                raise StopFit("diverged", f"loss became {value} at step {state.step} "
                                          f"(epoch {state.epoch_float:.2f})")


class TimeBudget:
    """Stops the fit as ``budget_exhausted`` before a step that would end past ``seconds`` of wall clock.

    Checked before each batch, so the evaluations after the previous step are on the clock. The next
    step is predicted to take as long as the fastest of the last few (their training time: evaluations
    are tallied apart), so one slow step, a recompilation say, does not end the run. Waiting for the
    budget to be spent instead overshot by a whole step, as long as the budget itself when steps are
    long (a 20 s budget ran 43 s). The first step always runs. A budget overrun all the same, by a step
    slower than the ones before or by an evaluation, is said in the detail.
    """

    WINDOW = 3  # recent steps the prediction takes the fastest of

    def __init__(self, seconds: float, clock: Clock) -> None:
        self.seconds, self.clock = seconds, clock
        self._steps: deque[float] = deque(maxlen=self.WINDOW)
        self._last: tuple[float, float] | None = None  # clock and evaluation time before the previous batch

    def before_batch(self, state: FitState) -> None:
        now, eval_s = self.clock.elapsed(sync=False), self.clock.eval_s
        last, self._last = self._last, (now, eval_s)
        if last is None:
            return
        evaluating = eval_s - last[1]
        self._steps.append(max(0.0, now - last[0] - evaluating))
        step_s = min(self._steps)
        if now + step_s <= self.seconds:
            return
        if now > self.seconds:
            why = f"the last step took {self._steps[-1]:.3g} s" + (
                f" and an evaluation {evaluating:.3g} s" if evaluating > 0 else "")
            raise StopFit("budget_exhausted", f"time budget of {self.seconds:g} s exceeded: {now:.1f} s at epoch "
                                              f"{state.epoch_float:.2f} ({why})")
        raise StopFit("budget_exhausted", f"time budget of {self.seconds:g} s used up at epoch "
                                          f"{state.epoch_float:.2f} ({now:.1f} s; the next step, ~{step_s:.3g} s, "
                                          "would overrun it)")


class ProgressBar:
    """A live line: epoch, step, images/s, last accuracy, elapsed (rich; refreshed a few times a second)."""

    def __init__(self, clock: Clock, *, console=None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.clock = clock
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]:.2f}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[ips]:,.0f} img/s"), TextColumn("acc {task.fields[acc]}"),
            TextColumn("{task.fields[elapsed]:.1f} s"), console=console, refresh_per_second=4,
            transient=True)
        self._task = None

    def before_fit(self, state: FitState) -> None:
        self.progress.start()
        self._task = self.progress.add_task("train", total=state.max_steps, epoch=0.0, ips=0.0,
                                            acc="-", elapsed=0.0)

    def after_step(self, state: FitState) -> None:
        if state.step % 8 and not state.at_end:
            return
        elapsed = self.clock.elapsed(sync=False)
        train_s = max(elapsed - self.clock.eval_s, 1e-9)
        acc = state.extras.get("last_accuracy")
        self.progress.update(self._task, completed=state.schedule_step, epoch=state.epoch_float,
                             ips=state.images_seen / train_s, elapsed=elapsed,
                             acc=f"{acc:.2%}" if acc is not None else "-")

    def after_fit(self, state: FitState) -> None:
        self.progress.stop()
