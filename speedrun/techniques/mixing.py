"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019): train on blends of image pairs against the
same blend of their targets.

Targets become class probabilities (n, k); ``smoothed_cross_entropy`` takes them as they are, label
smoothing included. Each image is paired with its neighbour in the batch (``roll`` by one): the batch
is already a random draw, so this is a random pairing that needs no permutation and never pairs an
image with itself. One lambda per batch, as in the papers and timm.
"""
from __future__ import annotations

import math
import random

import torch  # noqa: F401  (the doctests use it)
import torch.nn.functional as F
from torch import Tensor


def mixup_batch(images: Tensor, targets: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """``lam * x[i] + (1 - lam) * x[i - 1]`` for images and probability targets (n, k) alike.

    >>> x, t = mixup_batch(torch.ones(4, 1, 2, 2), F.one_hot(torch.arange(4), 4).float(), 0.75)
    >>> t[1].tolist()
    [0.25, 0.75, 0.0, 0.0]
    """
    mixed = images.mul(lam).add_(images.roll(1, 0), alpha=1.0 - lam)  # keeps the memory format of images
    return mixed, targets.mul(lam).add_(targets.roll(1, 0), alpha=1.0 - lam)


def cutmix_box(height: int, width: int, lam: float, rng: random.Random) -> tuple[int, int, int, int]:
    """A box (top, left, h, w) of about ``(1 - lam)`` of the image, centred uniformly, clipped at the edges."""
    side = math.sqrt(1.0 - lam)
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = max(cy - round(height * side / 2), 0), min(cy + round(height * side / 2), height)
    left, right = max(cx - round(width * side / 2), 0), min(cx + round(width * side / 2), width)
    return top, left, bottom - top, right - left


def cutmix_batch(images: Tensor, targets: Tensor, box: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """Paste ``box`` of image ``i - 1`` into image ``i``; targets mix by the pasted area (the box as
    clipped, not the lambda it was drawn from)."""
    top, left, h, w = box
    mixed = images.clone()
    mixed[:, :, top:top + h, left:left + w] = images.roll(1, 0)[:, :, top:top + h, left:left + w]
    lam = 1.0 - h * w / (images.shape[2] * images.shape[3])
    return mixed, targets.mul(lam).add_(targets.roll(1, 0), alpha=1.0 - lam)


class MixBatch:
    """Before each batch, with probability ``prob``: mixup or CutMix (even odds when both are on), with
    ``lam ~ Beta(alpha, alpha)``; the targets become probabilities. Draws come from a seeded host RNG,
    so choosing costs no device sync."""

    def __init__(self, num_classes: int, *, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 prob: float = 1.0, seed: int = 0) -> None:
        self.num_classes, self.prob = num_classes, prob
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.rng = random.Random(seed)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, saved: dict, state) -> None:
        self.rng.setstate(saved["rng"])

    def before_batch(self, state) -> None:
        if self.rng.random() >= self.prob or not (self.mixup_alpha or self.cutmix_alpha):
            return
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or self.rng.random() < 0.5)
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = self.rng.betavariate(alpha, alpha)
        targets = F.one_hot(state.targets, self.num_classes).float()
        if cutmix:
            box = cutmix_box(state.inputs.shape[2], state.inputs.shape[3], lam, self.rng)
            state.inputs, state.targets = cutmix_batch(state.inputs, targets, box)
        else:
            state.inputs, state.targets = mixup_batch(state.inputs, targets, lam)
