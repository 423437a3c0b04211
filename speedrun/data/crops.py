"""Batches cropped from images of varying sizes: the aspect cache (``RaggedImages``) or files decoded as
they are read (``imagefolder.FileImages``).

Training takes a random-resized crop per image and epoch from the whole stored picture (its own size
and aspect ratio), resized to the loader's current size (progressive resizing sets it); evaluation
resizes each image so its shorter side is ``size / crop_frac`` and keeps the centre ``size`` x ``size``
(ImageNet's 224 from 256). Each is "resize a window of the image to some size, then keep an
``out`` x ``out`` part of it" (``Views``), done one of two ways, equal up to uint8 rounding:

- ``crop_resize_each`` (CPU): ``F.interpolate(mode="bilinear", antialias=True)`` on each image's uint8
  window, PyTorch's fixed-point kernel, spread over a few threads. On the 2-core CPU a batch of 64
  crops of Imagewoof at 128 px takes ~30 ms on one thread, 13x less than the batched matmuls.
- ``resample`` (a device): the windows copied into one padded batch and resampled by two batched
  matmuls with per-image interpolation weights (``interpolation_weights``): one op for the whole batch,
  as the resident loader's square crops; dense in FLOPs, which a GPU has to spare.

A flip is the output mirrored: folded into the column weights (``resample``), or one batched flip.
"""
from __future__ import annotations

import functools

import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from speedrun.data.loader import (ResidentLoader, alternating_flip_mask, cutout_batch, interpolation_weights,
                                  process_shard, sample_crop_boxes, translate_batch)


@dataclass(frozen=True)
class Views:
    """What each image of a batch becomes: its pixels ``window`` (n, 4) = (top, left, height, width) resized
    to ``resized`` (n, 2) = (height, width), of which the ``out`` x ``out`` part at ``offset`` (n, 2) is kept."""

    window: np.ndarray
    resized: np.ndarray
    offset: np.ndarray


def random_views(sizes: np.ndarray, out: int, *, scale: Sequence[float], ratio: Sequence[float],
                 generator: torch.Generator | None = None) -> Views:
    """Random-resized crops (``sample_crop_boxes``: area fraction in ``scale``, aspect w/h log-uniform in
    ``ratio``) of images of (height, width) ``sizes``, each box resized to ``out`` x ``out``."""
    n = len(sizes)
    boxes = sample_crop_boxes(n, torch.as_tensor(sizes[:, 0]), torch.as_tensor(sizes[:, 1]), scale=tuple(scale),
                              ratio=tuple(ratio), generator=generator).numpy()
    return Views(boxes, np.full((n, 2), out), np.zeros((n, 2), np.int64))


def resized_side(size: int, crop_frac: float) -> int:
    """The shorter side an evaluated image is resized to before its centre ``size`` crop.

    >>> resized_side(224, 0.875), resized_side(128, 1.0)
    (256, 128)
    """
    return max(size, round(size / crop_frac))


def centre_views(sizes: np.ndarray, size: int, crop_frac: float) -> Views:
    """Resize-then-centre-crop, as torchvision's ``Resize(resized_side)`` then ``CenterCrop(size)``: the
    shorter side to ``resized_side(size, crop_frac)``, the longer to ``int(that * long / short)``, the
    centre ``size`` x ``size`` (offset ``round((resized - size) / 2)``) kept."""
    h, w = sizes[:, 0].astype(np.int64), sizes[:, 1].astype(np.int64)
    side = resized_side(size, crop_frac)
    resized_long = (side * np.maximum(h, w) / np.minimum(h, w)).astype(np.int64)  # torchvision's int(): floor
    resized = np.stack([np.where(h <= w, side, resized_long), np.where(h <= w, resized_long, side)], 1)
    offset = np.round((resized - size) / 2).astype(np.int64)
    zeros = np.zeros_like(h)
    return Views(np.stack([zeros, zeros, h, w], 1), resized, offset)


def crop_resize_each(images: Sequence[Tensor], views: Views, out: int, *, pool: ThreadPoolExecutor | None = None
                     ) -> Tensor:
    """uint8 (n, C, out, out) channels-last: each (C, h, w) uint8 image's window resized by
    ``F.interpolate(mode="bilinear", antialias=True)``, the ``out`` part kept; in ``pool``'s threads."""
    n, channels = len(images), images[0].shape[0]
    batch = torch.empty((n, channels, out, out), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    inference = torch.is_inference_mode_enabled()  # thread-local: the pool's threads take the caller's

    def one(i: int) -> None:
        top, left, h, w = views.window[i].tolist()
        (rh, rw), (oy, ox) = views.resized[i].tolist(), views.offset[i].tolist()
        with torch.inference_mode(inference):
            window = images[i][None, :, top:top + h, left:left + w]
            resized = F.interpolate(window, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
            batch[i] = resized[0, :, oy:oy + out, ox:ox + out]

    if pool is None or n < 8:
        for i in range(n):
            one(i)
    else:
        list(pool.map(one, range(n)))
    return batch


def gather_windows(images: Sequence[Tensor], window: np.ndarray, *, pin: bool = False) -> Tensor:
    """Copy window ``window[i]`` of each (C, h, w) image into a uint8 (n, C, H, W) batch, top-left aligned,
    H and W the largest window's, on the images' device; the rest is left unset (no weight reads it)."""
    n, first = len(images), images[0]
    height, width = int(window[:, 2].max()), int(window[:, 3].max())
    out = torch.empty((n, first.shape[0], height, width), dtype=torch.uint8, device=first.device, pin_memory=pin)
    for i, (top, left, h, w) in enumerate(window.tolist()):
        out[i, :, :h, :w] = images[i][:, top:top + h, left:left + w]
    return out


def resample(batch: Tensor, views: Views, out: int, flips: np.ndarray | Tensor | None = None) -> Tensor:
    """Float (n, C, out, out) images from ``gather_windows``'s batch, as ``views`` say, by two batched
    matmuls with antialiased bilinear weights; images with ``flips[i]`` mirrored left-right."""
    device = batch.device
    window = torch.as_tensor(views.window, device=device)
    resized = torch.as_tensor(views.resized, device=device)
    offset = torch.as_tensor(views.offset, device=device)
    step = window[:, 2:] / resized  # input pixels per resized pixel
    first, zero = offset * step, torch.zeros(len(window), device=device)
    rows = interpolation_weights(first[:, 0], step[:, 0], zero, window[:, 2], batch.shape[2], out)
    cols = interpolation_weights(first[:, 1], step[:, 1], zero, window[:, 3], batch.shape[3], out)
    if flips is not None:
        cols = torch.where(torch.as_tensor(flips, device=device)[:, None, None], cols.flip(1), cols)
    x = batch.to(torch.float32)
    height, width = x.shape[2:]
    if height * out * (width + out) <= out * width * (height + out):  # contract the longer side first
        return rows[:, None] @ (x @ cols.transpose(1, 2)[:, None])
    return (rows[:, None] @ x) @ cols.transpose(1, 2)[:, None]


def _as_tensor(image: Any) -> Tensor:
    """A (C, h, w) image as a tensor, sharing the array's memory (copied when numpy marks it read-only,
    as Pillow's arrays are: torch warns about wrapping those)."""
    if isinstance(image, Tensor):
        return image
    return torch.from_numpy(image if image.flags.writeable else image.copy())


@dataclass
class _Batch:
    """A batch on its way: uint8 windows (``resampled`` False, for ``resample`` on the device) or crops,
    its views and flips, and the rows of the epoch's order it holds (files that failed are dropped)."""

    pixels: Tensor
    views: Views | None
    flips: np.ndarray | None
    rows: np.ndarray
    resampled: bool


class CropLoader(ResidentLoader):
    """``ResidentLoader``'s batches (order, sharding, normalization, flips) from images of varying sizes.

    ``images``: ``RaggedImages`` (its buffer a CPU tensor or memory map, or on a device) or ``FileImages``
    (decoded in a pool of ``workers`` threads as batches are read). Training batches are random-resized
    crops (``rrc_scale``, ``rrc_ratio``; without ``rrc_scale``, the evaluation's centre crop) at
    ``size`` px, or at ``self.size`` when progressive resizing sets it; evaluation batches are
    ``centre_views`` at ``size`` with ``crop_frac``. ``batched`` picks how: ``resample``'s batched
    matmuls on ``device`` (the windows gathered where the images are: on the device, or on the host and
    copied), or ``crop_resize_each`` per image in the pool's threads on the host (then copied to the
    device); None: batched when ``device`` is a GPU. With ``prefetch`` > 0 a background thread makes that many batches ahead; 0
    makes each when it is asked for. The crops of epoch ``e`` depend only on ``(seed, e, rank)``.

    >>> data = load_prepared(prepared.directory, mmap=True)  # an aspect cache  # doctest: +SKIP
    >>> loader = CropLoader(data.train_images.to("cpu"), data.train_labels, size=128, batch_size=64,
    ...                     mean=data.mean, std=data.std, train=True, flip=True, rrc_scale=(0.35, 1))  # doctest: +SKIP
    """

    def __init__(self, images: Any, labels: Any, *, size: int, crop_frac: float = 0.875,
                 device: torch.device | str | None = None, workers: int = 0, prefetch: int = 0,
                 batched: bool | None = None, **options: Any) -> None:
        data = getattr(images, "data", None)
        device = torch.device(device if device is not None else data.device if isinstance(data, Tensor) else "cpu")
        labels = torch.as_tensor(labels if isinstance(labels, Tensor) else np.asarray(labels), device=device)
        # ResidentLoader reads only the device of its images: an empty stand-in gives it that.
        super().__init__(torch.empty(0, dtype=torch.uint8, device=device), labels, **options)
        self.store, self.crop_size, self.crop_frac, self.prefetch = images, size, crop_frac, prefetch
        self.batched = device.type != "cpu" if batched is None else batched
        from speedrun.data.imagefolder import default_workers

        self._pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="speedrun-crop")
        weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        self._pin = device.type == "cuda"

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the batches at rest (not progressively resized)."""
        return self.crop_size, self.crop_size

    def current_size(self) -> int:
        """The side of the batches now: progressive resizing's when it set one, else ``crop_size``."""
        return self.size if self.train and self.size is not None else self.crop_size

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        from speedrun.data.stream import Prefetcher

        order = self.epoch_order(epoch)
        host_order = None if order is None else order.cpu().numpy()
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + self.rank)

        def make(chunk: slice) -> _Batch:
            rows = np.arange(chunk.start, chunk.stop) if host_order is None else host_order[chunk]
            return self._make(rows, epoch, gen)

        batches = (map(make, self._iter_slices()) if self.prefetch <= 0
                   else Prefetcher(make, self._iter_slices(), depth=self.prefetch))
        try:
            for batch in batches:
                if len(batch.rows):  # else every file of the batch failed to decode
                    yield self._finish(batch), self.labels[torch.as_tensor(batch.rows, device=self._device)]
        finally:
            if isinstance(batches, Prefetcher):
                batches.close()

    def _make(self, rows: np.ndarray, epoch: int, gen: torch.Generator) -> _Batch:
        """Read and crop the images of ``rows``; random draws come from ``gen``, in batch order."""
        images = self.store.read(rows, self._pool)
        kept = [i for i, image in enumerate(images) if image is not None]
        if len(kept) < len(images):
            rows, images = rows[kept], [images[i] for i in kept]
        if not images:
            return _Batch(torch.empty(0), None, None, rows, False)
        images = [_as_tensor(image) for image in images]
        sizes = np.array([image.shape[1:] for image in images], dtype=np.int64)
        out = self.current_size()
        if self.train and self.rrc_scale is not None:
            views = random_views(sizes, out, scale=self.rrc_scale, ratio=self.rrc_ratio, generator=gen)
        else:
            views = centre_views(sizes, out, self.crop_frac)
        flips = None
        if self._flip_base is not None:
            flips = alternating_flip_mask(self._flip_base[torch.as_tensor(rows, device=self._device)], epoch).cpu().numpy()
        elif self.flip:
            flips = (torch.rand(len(rows), generator=gen) < 0.5).numpy()
        if self.batched:  # windows gathered where the images are (pinned, on a GPU's host), resampled on the device
            pin = self._pin and images[0].device.type == "cpu"
            return _Batch(gather_windows(images, views.window, pin=pin), views, flips, rows, False)
        pixels = crop_resize_each(images, views, out, pool=self._pool)
        if flips is not None and flips.any():
            mirrored = torch.as_tensor(flips)
            pixels[mirrored] = pixels[mirrored].flip(3)
        if self._pin:
            pixels = pixels.pin_memory()
        return _Batch(pixels, views, flips, rows, True)

    def _finish(self, batch: _Batch) -> Tensor:
        if batch.resampled:
            x = batch.pixels.to(self._device, non_blocking=True).to(torch.float32)
        else:
            x = resample(batch.pixels.to(self._device, non_blocking=True), batch.views, self.current_size(),
                         batch.flips)
        x = torch.addcmul(self._shift, x, self._scale)
        if self.translate_px:
            x = translate_batch(x, self.translate_px, self._gen)
        if self.cutout_px:
            x = cutout_batch(x, self.cutout_px, self._gen)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype) if self.dtype != torch.float32 else x

    def sample(self, count: int) -> Tensor:
        """``count`` images drawn without replacement (all when fewer), each its evaluation crop at the
        crop size, normalized, not augmented: for data-dependent initialisation."""
        gen = torch.Generator().manual_seed(self.seed)
        return self._centre_batch(torch.randperm(len(self.labels), generator=gen)[:count].numpy())

    def example(self, count: int) -> Tensor:
        """The first ``count`` images as the model sees them at rest, for counting FLOPs."""
        return self._centre_batch(np.arange(min(count, len(self.labels))))

    def _centre_batch(self, rows: np.ndarray) -> Tensor:
        images = [_as_tensor(im) for im in self.store.read(rows, self._pool) if im is not None]
        views = centre_views(np.array([im.shape[1:] for im in images], dtype=np.int64), self.crop_size,
                             self.crop_frac)
        if self.batched:
            x = resample(gather_windows(images, views.window), views, self.crop_size).to(self._device)
        else:
            x = crop_resize_each(images, views, self.crop_size).to(self._device, torch.float32)
        return torch.addcmul(self._shift, x, self._scale)


PREFETCH_CPU = 0  # host crops for a CPU: made when asked for (BENCHMARKS.md, "Crops from the aspect cache")
PREFETCH_READ = 4  # batches read ahead from a memory map for a device, or decoded ahead from files


def crop_loaders(recipe: Any, images: Any, directory: Any, device: torch.device, seed: int, *,
                 holdout: Any = None, read_test: bool = True
                 ) -> tuple[Any, CropLoader, CropLoader | None, CropLoader | None, str]:
    """``(images, train_loader, test_loader, val_loader, kind)`` for an aspect or files cache, as ``train``
    builds them (``speedrun.train.run.build_loaders``); ``images.input_size`` becomes the training crop's
    size. ``holdout`` (``speedrun.data.split.Holdout``): its rows of the training split are evaluated as
    the validation split and not trained on; ``read_test=False``: no test loader.

    ``kind``: ``resident`` (the ragged buffer in memory: on a CPU the cache's memory map, its pages the
    page cache's, nothing copied; on a GPU, copied there), ``stream`` (a GPU, the set larger than half
    its memory: the buffer stays a host memory map, each batch's windows gathered ahead by a thread into
    pinned memory, resampled on the GPU) or ``decode`` (files decoded ahead by a thread pool). On a GPU
    the crops are ``resample``'s batched matmuls, on a CPU ``crop_resize_each`` (BENCHMARKS.md, "crops
    from the aspect cache against the training step"); the GPU paths are untested on a GPU so far.
    """
    from speedrun.config import ConfigError
    from speedrun.data.stream import choose_loader

    data = recipe.data
    if images.layout == "files":
        kind = "decode"
    else:
        kind = choose_loader("auto" if data.loader == "decode" else data.loader, images.nbytes, device)
        on = device if kind == "resident" else torch.device("cpu")
        images = replace(images, train_images=images.train_images.to(on), test_images=images.test_images.to(on))
    prefetch = PREFETCH_CPU if kind == "resident" or device.type == "cpu" and kind == "stream" else PREFETCH_READ
    if prefetch and data.resize_scale_batch:
        raise ConfigError(f"data.resize_scale_batch needs batches made as they are asked for; the {kind} loader "
                          "makes them ahead at a fixed batch size")
    size = data.crop_size or images.input_size[0]
    images = replace(images, input_size=(size, size))
    common = dict(mean=images.mean, std=images.std, channels_last=recipe.train.channels_last, device=device,
                  workers=data.decode_workers, prefetch=prefetch, crop_frac=recipe.eval.crop_frac)
    train_x, train_y = images.train_images, images.train_labels
    if holdout is not None:
        train_x, train_y = train_x.subset(holdout.train_rows), train_y[holdout.train_rows]
    train_loader = CropLoader(
        train_x, train_y, size=size, batch_size=recipe.train.batch_size // process_shard()[1], train=True,
        seed=seed, flip=data.flip, alternating_flip=data.alternating_flip, translate_px=data.translate_px,
        cutout_px=data.cutout_px, rrc_scale=data.rrc_scale or None, rrc_ratio=data.rrc_ratio, **common)
    # Each rank evaluates its share of the split; the evaluator all-reduces the counts (train.hooks.evaluate).
    evaluation = functools.partial(CropLoader, size=recipe.eval.crop_size or size, batch_size=recipe.eval.batch_size,
                                   train=False, **common)
    test_loader = evaluation(images.test_images, images.test_labels) if read_test else None
    val_loader = None if holdout is None else evaluation(images.train_images.subset(holdout.val_rows),
                                                         images.train_labels[holdout.val_rows])
    return images, train_loader, test_loader, val_loader, kind
