"""Progressive freezing: the first layer's trainable parameters (stem-freezing), or the model's first
blocks one after another (layer-freezing, FreezeOut), stop training after a fraction of the schedule,
and from then on the backward pass stops at the first layer still training.

airbench trains its whitening layer's bias for the first 3 epochs of ~10 and then freezes it: the
same accuracy in less time (KellerJordan/cifar10-zoo ablations: 5.5 -> 5.2 A100-seconds at 94.0%).
It is the first step of FreezeOut (Brock et al. 2017), which freezes layers one after another. Once
nothing before the second conv trains, autograd skips that conv's input gradient and the first
layer's backward, which on a small CPU net is a large part of the step (the first layers run at the
highest resolution). With a frozen patch-whitening conv the first layer's trainable parameters are
only a few (its bias, or the BatchNorm after it): they settle early, so freezing them costs little.

A model supports stem-freezing by defining ``stem_parameters()``: every parameter of its first layer,
the normalization after it included; layer-freezing by defining ``block_parameters()``: one list of
parameters per block after the stem, from the input on.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable, Iterator, Sequence

from torch import nn


def freeze_(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Stop training ``params``: ``requires_grad`` off and any gradient dropped (optimizers skip a
    parameter without one). Returns the parameters that were trainable, so the caller can undo it.

    >>> frozen = freeze_(model.stem_parameters())  # doctest: +SKIP
    """
    changed = [p for p in params if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
        p.grad = None
    return changed


@contextlib.contextmanager
def frozen(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` off for ``params`` inside the block (gradients kept): to count the FLOPs of a
    step with them frozen."""
    changed = [p for p in params if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


class Freeze:
    """Freezes ``params`` at the first batch at or past ``after_frac`` of the schedule and appends
    ``(images seen then, a context that freezes them again)`` to ``state.extras["freezes"]`` (the run's
    FLOP count weighs each stretch of steps by what was frozen during it); ``after_fit`` makes them
    trainable again, so the returned model trains like a fresh one if a user goes on."""

    def __init__(self, params: Iterable[nn.Parameter], *, after_frac: float) -> None:
        if not 0.0 <= after_frac <= 1.0:
            raise ValueError(f"after_frac must be in [0, 1], got {after_frac}")
        self.params, self.after_frac = list(params), after_frac
        self.frozen: list[nn.Parameter] | None = None  # None until the freeze happens
        self.from_image = 0  # images seen when it happened

    def before_batch(self, state) -> None:
        if self.frozen is None and state.progress >= self.after_frac:
            self._freeze(state, state.images_seen)

    def _freeze(self, state, from_image: int) -> None:
        self.frozen, self.from_image = freeze_(self.params), from_image
        state.extras.setdefault("freezes", []).append((from_image, functools.partial(frozen, self.frozen)))

    def state_dict(self) -> dict:
        return {"frozen_from_image": None if self.frozen is None else self.from_image}

    def load_state_dict(self, saved: dict, state) -> None:
        if saved["frozen_from_image"] is not None:
            self._freeze(state, saved["frozen_from_image"])

    def after_fit(self, state) -> None:
        for p in self.frozen or ():
            p.requires_grad_(True)


class FreezeStem(Freeze):
    """stem-freezing's hook: the first layer's parameters (a class of its own because a checkpoint
    names each hook's state by its class)."""


class FreezeOut:
    """layer-freezing's hook (FreezeOut, Brock et al. 2017): block i's parameters freeze after
    ``fracs[i]`` of the schedule, each as a ``Freeze``; blocks past the last fraction never do.

    Frozen front to back, the backward stops at the first block still training: a frozen block costs
    neither its weight gradients nor its input gradient. On a small CPU net the first blocks run at the
    highest resolution, so they are the expensive ones: with airbench's first conv group frozen
    ``cifar10-cpu``'s step took 236 ms instead of 363, with the first two 169 ms (BENCHMARKS.md).
    """

    def __init__(self, blocks: Sequence[Iterable[nn.Parameter]], fracs: Sequence[float]) -> None:
        if len(fracs) > len(blocks):
            raise ValueError(f"{len(fracs)} freeze fractions for a model of {len(blocks)} blocks")
        self.freezes = [Freeze(block, after_frac=f) for block, f in zip(blocks, fracs)]

    def before_batch(self, state) -> None:
        for f in self.freezes:
            f.before_batch(state)

    def state_dict(self) -> dict:
        return {"blocks": [f.state_dict() for f in self.freezes]}

    def load_state_dict(self, saved: dict, state) -> None:
        for f, block in zip(self.freezes, saved["blocks"]):
            f.load_state_dict(block, state)

    def after_fit(self, state) -> None:
        for f in self.freezes:
            f.after_fit(state)
