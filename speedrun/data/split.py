"""The validation split: a stratified hold-out from a dataset's training split, the same for every seed.

Hyperparameters chosen by looking at test accuracy are fitted to the test set; a search (``speedrun
tune``) judges its candidates on this hold-out instead and reads the test split only once, at the end.
The hold-out is a function of the training labels and the fraction alone, not of the run's seed, so
every trial of a search, and every seed of a recipe, holds out the same images: the split belongs to
the dataset. Per class, ``round(frac * n_class)`` images (at least one, and at least one left to
train on) are drawn by a generator of fixed seed.

>>> import numpy as np
>>> train, val = holdout_split(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1]), 0.25)
>>> len(val), sorted(np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])[val].tolist())
(3, [0, 1, 1])
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SPLIT_SEED = 20260917  # fixed: the hold-out must not move with the run's seed


@dataclass(frozen=True)
class Holdout:
    """Row indices (sorted) of the training arrays that train and that validate; ``digest`` names the
    split, so two runs can be seen to have held out the same images."""

    frac: float
    train_rows: np.ndarray
    val_rows: np.ndarray

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.val_rows.astype(np.int64).tobytes()).hexdigest()[:12]

    def describe(self) -> dict:
        """What a run records of its split (``env["val_split"]``)."""
        return {"frac": self.frac, "val_images": len(self.val_rows), "train_images": len(self.train_rows),
                "digest": self.digest, "rule": f"stratified per class, fixed (generator seed {SPLIT_SEED})"}


def holdout_split(labels: np.ndarray, frac: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)``: sorted row indices of ``labels`` that train and that are held out.

    Stratified: each class gives ``round(frac * n)`` of its ``n`` images, at least 1 and at most
    ``n - 1`` (a class of one image stays in training). Deterministic in ``labels`` and ``frac``.
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1); got {frac}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(SPLIT_SEED)
    held = []
    for cls in np.unique(labels):  # ascending: the draws do not depend on the labels' order of appearance
        rows = np.flatnonzero(labels == cls)
        k = min(max(1, round(frac * len(rows))), len(rows) - 1)
        held.append(rng.permutation(rows)[:k] if k > 0 else rows[:0])
    val = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return train, val


def holdout(labels: np.ndarray, frac: float) -> Holdout:
    train, val = holdout_split(labels, frac)
    return Holdout(frac, train, val)
