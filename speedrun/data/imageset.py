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
from typing import Any, Protocol, Sequence

import numpy as np

from speedrun.data import DataError


@dataclass(frozen=True)
class RaggedImages:
    """uint8 images of varying sizes, stored back to back in one flat buffer, each (h_i, w_i, C) as decoders
    give them and channels-last networks take them.

    The aspect-preserving cache (FFCV's "max resolution" idea): each image keeps its own aspect ratio
    at a capped shorter side, with no padding. ``data`` is a flat numpy array (in memory or a memory
    map) or a torch tensor (on a device); ``index`` is an (N, 3) int64 array of (offset, height, width).
    Images are read as (C, h, w) views.
    """

    data: Any  # flat uint8: numpy array, memory map or torch tensor
    index: np.ndarray  # (N, 3) int64: offset into data, height, width
    channels: int

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Any:
        """Image ``i`` as a (C, h, w) view of the buffer."""
        offset, h, w = (int(v) for v in self.index[i])
        pixels = self.data[offset:offset + self.channels * h * w]
        if isinstance(pixels, np.ndarray):
            return pixels.reshape(h, w, self.channels).transpose(2, 0, 1)
        return pixels.view(h, w, self.channels).permute(2, 0, 1)

    def read(self, rows: Sequence[int], pool: Any = None) -> list[Any]:
        """Images ``rows``, as views (the interface the crop loaders read their stores through)."""
        return [self[int(i)] for i in rows]

    def subset(self, rows: Sequence[int] | np.ndarray) -> RaggedImages:
        """Images ``rows`` of this buffer, in that order, sharing it (a hold-out split: nothing copied)."""
        return RaggedImages(self.data, self.index[np.asarray(rows, dtype=np.int64)], self.channels)

    @property
    def sizes(self) -> np.ndarray:
        """(N, 2) heights and widths."""
        return self.index[:, 1:]

    @property
    def nbytes(self) -> int:
        return int(self.channels * (self.index[:, 1] * self.index[:, 2]).sum()) if len(self) else 0

    def to(self, device: Any) -> RaggedImages:
        """The same images with the buffer as a torch tensor on ``device``. A writable memory map (numpy's
        copy-on-write mode ``c``) becomes a CPU tensor without a copy: its pages stay the page cache's."""
        import torch

        data = self.data if isinstance(self.data, torch.Tensor) else torch.from_numpy(self.data)
        return RaggedImages(data.to(device), self.index, self.channels)

    @classmethod
    def from_list(cls, images: Sequence[np.ndarray], channels: int = 3) -> RaggedImages:
        """Pack (C, h, w) uint8 arrays into one buffer (``channels`` when the list is empty)."""
        if not images:
            return cls(np.empty(0, np.uint8), np.zeros((0, 3), np.int64), channels)
        sizes = np.array([im.shape[1:] for im in images], dtype=np.int64)
        lengths = np.array([im.size for im in images], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        data = np.concatenate([np.ascontiguousarray(np.asarray(im, np.uint8).transpose(1, 2, 0)).ravel()
                               for im in images])
        return cls(data, np.column_stack([offsets, sizes]), images[0].shape[0])


@dataclass(frozen=True)
class ImageSet:
    """A prepared dataset: uint8 images and int64 labels for both splits.

    Images are an (N, C, H, W) array (the square cache), ``RaggedImages`` (the aspect-preserving cache)
    or files decoded on access (``imagefolder.FileImages``). The last two have no one size: the loaders
    crop them to ``input_size`` (the recipe's ``data.crop_size``, by default the cache's nominal square).
    """

    name: str
    train_images: Any  # np.ndarray (N, C, H, W), RaggedImages or FileImages
    train_labels: np.ndarray
    test_images: Any
    test_labels: np.ndarray
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units, over the training split
    std: tuple[float, ...]
    details: dict[str, Any] = field(default_factory=dict, compare=False)  # how it was read; kept in meta.json
    input_size: tuple[int, int] | None = None  # what the loaders emit, for images of no one size

    @property
    def layout(self) -> str:
        """``square`` (one size), ``aspect`` (each image its own size) or ``files`` (decoded on access)."""
        if isinstance(self.train_images, np.ndarray):
            return "square"
        return "aspect" if isinstance(self.train_images, RaggedImages) else "files"

    @property
    def channels(self) -> int:
        return self.train_images.shape[1] if isinstance(self.train_images, np.ndarray) else self.train_images.channels

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images the model sees: the stored size, or ``input_size``."""
        if isinstance(self.train_images, np.ndarray):
            return tuple(self.train_images.shape[2:])  # type: ignore[return-value]
        return tuple(self.input_size or (0, 0))  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def nbytes(self) -> int:
        """Bytes of pixels the set holds once loaded (none for files decoded on access)."""
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

    def add(self, images: np.ndarray | RaggedImages) -> None:
        if isinstance(images, RaggedImages):
            for i in range(len(images)):
                self.add(images[i][None])
            return
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
