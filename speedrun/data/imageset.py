"""What every dataset reader builds: the ``ImageSet`` of uint8 arrays, the ``Source`` protocol, exact
channel statistics, and the checks and errors they share (too few classes, a full disk, names that
are not UTF-8). The bottom of the data layer: the readers (IDX in ``sources``, CIFAR, image folders,
archives) import it, and it imports none of them.
"""
from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from speedrun.data import DataError


@dataclass(frozen=True)
class ImageSet:
    """A prepared dataset: uint8 images (N, C, H, W) and int64 labels for both splits."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units, over the training split
    std: tuple[float, ...]
    details: dict[str, Any] = field(default_factory=dict, compare=False)  # how it was read; kept in meta.json

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train_images.shape[2:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def nbytes(self) -> int:
        return self.train_images.nbytes + self.test_images.nbytes


class Source(Protocol):
    """Raw files of a dataset. ``fingerprint`` must be cheap (it runs before every training run).

    A source may also define ``read_into(directory) -> ImageSet``: it then writes the four
    ``.npy`` arrays into the cache folder being prepared itself, a chunk at a time, and
    ``prepare`` calls it instead of ``read`` (see ``ImageFolderSource``).
    """

    name: str

    def fingerprint(self) -> str: ...
    def read(self) -> ImageSet: ...


class ChannelMoments:
    """Exact per-channel pixel sums, fed a chunk of images at a time.

    Integer sums need no float copy of the dataset (a float64 copy is 8x its size), and give
    the same mean and std however the images are chunked.
    """

    def __init__(self, channels: int) -> None:
        self.pixels = 0  # per channel
        self.sum = np.zeros(channels, np.int64)
        self.sum_sq = np.zeros(channels, np.int64)  # overflows past 1.4e14 pixels per channel

    def add(self, images: np.ndarray) -> None:
        if images.size == 0:
            return
        step = max(1, (1 << 22) // (images[0].size or 1))  # temporaries of a few MB
        for i in range(0, len(images), step):
            x = images[i:i + step]
            self.sum += x.sum(axis=(0, 2, 3), dtype=np.int64)
            self.sum_sq += np.square(x, dtype=np.uint16).sum(axis=(0, 2, 3), dtype=np.int64)
        self.pixels += images.shape[0] * images.shape[2] * images.shape[3]

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        n = max(self.pixels, 1)
        mean = self.sum / n
        var = np.maximum(self.sum_sq / n - mean ** 2, 0.0)
        return tuple(float(m) / 255 for m in mean), tuple(float(s) / 255 for s in np.sqrt(var))


# ---------------------------------------------------------------- IDX (MNIST family)

def image_set(name: str, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
              classes: tuple[str, ...]) -> ImageSet:
    """An ImageSet of in-memory arrays, with its training-split statistics."""
    train_x = np.ascontiguousarray(train_x, dtype=np.uint8)
    moments = ChannelMoments(train_x.shape[1])  # once, at preparation time
    moments.add(train_x)
    mean, std = moments.mean_std()
    return ImageSet(name, train_x, np.asarray(train_y, dtype=np.int64),
                    np.ascontiguousarray(test_x, dtype=np.uint8), np.asarray(test_y, dtype=np.int64),
                    tuple(classes), mean, std)


def printable(name: str) -> str:
    """A file name as people can read and terminals can print it: bytes that are not UTF-8 (names from
    archives made on Windows, which Python holds as lone surrogates) become ``\\xNN`` escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def check_classes(where: str, classes: tuple[str, ...], train_labels: np.ndarray | None = None) -> None:
    """Refuse fewer than two classes (with training images, when the labels are given): any net
    "reaches" 100% on a single class, with zero loss."""
    if train_labels is None:
        present = np.arange(len(classes))
    else:
        present = np.flatnonzero(np.bincount(train_labels, minlength=len(classes)))
    if len(present) < 2:
        found = f"only class {classes[present[0]]!r}" if len(present) else "no class"
        raise DataError(f"{where}: {found} in the training split; classification needs at least 2 classes")


def human_bytes(n: float) -> str:
    """``1.5 GiB``, ``980.0 KiB``, ``12 B``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB"


def no_space(folder: Path, needed: int | None, what: str = "the dataset cache") -> DataError:
    """The one-line error for a disk too full to take ``needed`` bytes under ``folder``."""
    try:
        free = human_bytes(shutil.disk_usage(folder if folder.exists() else folder.parent).free)
    except OSError:
        free = "an unknown amount"
    need = f"needs about {human_bytes(needed)}, and {free} are free" if needed else f"needs more than the {free} free"
    return DataError(f"no space left in {folder} for {what}: it {need}; free some space, or set SPEEDRUN_HOME "
                     "to a folder on a larger disk")


def disk_full(e: OSError, folder: Path) -> bool:
    """Whether a failed write under ``folder`` ran out of space. NumPy's ``tofile`` (under ``np.save``)
    reports a short write with no errno, so an error without one on a disk left (nearly) empty counts too."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return e.errno is None and shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def check_space(folder: Path, needed: int, what: str = "the dataset cache") -> None:
    """Fail before writing ``needed`` bytes under ``folder`` when its disk cannot take them."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the write itself will tell
    if free < needed:
        raise no_space(folder, needed, what)
