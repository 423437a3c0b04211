"""The training loop: a skeleton of named events, with every tweak a hook filling one or two of them.

The loop knows the events and the state, never a technique by name. A hook is any object with
methods named after events, each taking the ``FitState``. Hooks stop the fit by raising
``StopFit``; ``after_*`` events run in reverse order so a hook can undo what its ``before_*``
did. Per-event hook lists are built once, so an unused event costs nothing.

A hook whose state a resumed fit needs (an average of the weights, a random generator, a tally)
also has ``state_dict()`` and ``load_state_dict(state_dict, state)``, as Lightning's and fastai's
callbacks do; the FitState is passed so a hook can re-apply what it keeps there (``eval_model``,
``extras``). ``speedrun.train.checkpoint`` saves and restores them without knowing the hooks.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import Tensor, nn

EVENTS = ("before_fit", "before_epoch", "before_batch", "after_loss", "after_step", "after_epoch",
          "after_fit")


class StopFit(Exception):
    """Raised by a hook to end training with an outcome (``reached``, ``diverged``, ...)."""

    def __init__(self, outcome: str, detail: str = "") -> None:
        super().__init__(detail or outcome)
        self.outcome, self.detail = outcome, detail


@dataclass
class FitState:
    """Everything a hook may read or change, passed explicitly to every event."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    loader: Any  # has .epoch(e) -> iterator of (inputs, targets), and len()
    schedule_steps: int  # the LR schedule's length, in schedule steps (see ``schedule_step``)
    max_steps: int  # training stops here even if the schedule is longer (an epoch budget)
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    grad_scaler: torch.amp.GradScaler | None = None
    step: int = 0
    epoch: int = 0
    images_seen: int = 0
    inputs: Tensor | None = None
    targets: Tensor | None = None
    loss: Tensor | None = None
    eval_model: nn.Module | None = None  # what evaluations use when not the model (averaged weights)
    outcome: str = "running"
    detail: str = ""
    extras: dict[str, Any] = field(default_factory=dict)  # scratch space for hooks
    # Images in one schedule step, when the schedule counts images because batches may change size
    # (batch scaling with progressive resizing); 0: the schedule counts optimizer steps.
    step_images: int = 0
    steps_per_epoch: int = field(init=False)  # len(loader) at the start, in schedule steps

    def __post_init__(self) -> None:
        self.steps_per_epoch = len(self.loader)

    @property
    def schedule_step(self) -> float:
        """Steps done in the schedule's unit: optimizer steps, or images seen / ``step_images``."""
        return self.images_seen / self.step_images if self.step_images else self.step

    @property
    def progress(self) -> float:
        """Fraction of the schedule done, in [0, 1]."""
        return min(self.schedule_step / self.schedule_steps, 1.0)

    @property
    def at_end(self) -> bool:
        """True once ``max_steps`` schedule steps are done: the loop stops after this step."""
        return self.schedule_step >= self.max_steps

    @property
    def epoch_float(self) -> float:
        return self.schedule_step / self.steps_per_epoch


def fit(state: FitState, hooks: Sequence[object], *, restore: Callable[[FitState], None] | None = None
        ) -> FitState:
    """Train until ``max_steps`` or until a hook raises StopFit; Ctrl-C ends it as ``interrupted``.

    ``restore`` continues a checkpointed fit (``speedrun.train.checkpoint``): it is called after
    ``before_fit``, once every hook has set itself up as for a new fit, and overwrites the model,
    optimizer, counters, loader position, RNGs and hook states with the saved ones; the loop then
    picks up at the step after the checkpoint (``before_epoch`` fires again for the epoch it is in).
    """
    table = {event: [getattr(h, event) for h in hooks if hasattr(h, event)] for event in EVENTS}
    for event in EVENTS:
        if event.startswith("after_"):
            table[event].reverse()

    def fire(event: str) -> None:
        for fn in table[event]:
            fn(state)

    model, optimizer, scaler = state.model, state.optimizer, state.grad_scaler
    model.train()
    try:
        fire("before_fit")
        if restore is not None:
            restore(state)
        while not state.at_end:
            fire("before_epoch")
            for state.inputs, state.targets in state.loader.epoch(state.epoch):
                fire("before_batch")
                with state.autocast():
                    state.loss = state.loss_fn(model(state.inputs), state.targets)
                fire("after_loss")
                optimizer.zero_grad(set_to_none=True)
                if scaler is None:
                    state.loss.backward()
                    optimizer.step()
                else:  # fp16: scale the loss so small gradients survive, skip steps that overflow
                    scaler.scale(state.loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                state.step += 1
                state.images_seen += len(state.targets)
                fire("after_step")
                if state.at_end:
                    break
            state.epoch += 1
            fire("after_epoch")
        state.outcome = "completed"
    except StopFit as stop:
        state.outcome, state.detail = stop.outcome, stop.detail
    except KeyboardInterrupt:
        state.outcome, state.detail = "interrupted", f"interrupted at step {state.step}"
    fire("after_fit")
    return state
