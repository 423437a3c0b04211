"""A device-resident loader: the whole uint8 set lives on the device, batches are made with tensor ops.

No worker processes: shuffling is one ``randperm`` per epoch, normalization and augmentation are
applied to a whole batch at once (the airbench approach), so the input pipeline costs a small
fraction of a training step on CPU as on GPU.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


def flip_batch(images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mirror a random half of the images (N, C, H, W) left-right."""
    mask = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], images.flip(3), images)


def alternating_flip_mask(base: Tensor, epoch: int) -> Tensor:
    """airbench's alternating flip: ``base`` (one random bool per image, drawn once) decides epoch 0;
    every later epoch flips exactly the images the previous one did not, so each image is seen both
    ways every two epochs instead of by chance."""
    return base ^ bool(epoch % 2)


def cutout_batch(images: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero a ``size`` x ``size`` square at a random centre of each image (clipped at the borders)."""
    if size == 0:
        return images
    n, _, h, w = images.shape
    cy = torch.randint(0, h, (n,), device=images.device, generator=generator)[:, None, None]
    cx = torch.randint(0, w, (n,), device=images.device, generator=generator)[:, None, None]
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(h, device=images.device)[None, :, None]
    cols = torch.arange(w, device=images.device)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return images.masked_fill(inside[:, None], 0.0)


def translate_batch(images: Tensor, max_px: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by its own random (dy, dx) in [-max_px, max_px], filling by reflection.

    Equivalent to reflect-padding by ``max_px`` and taking a random crop of the original size.
    """
    if max_px == 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_px,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * max_px + 1, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * max_px + 1, (n,), device=images.device, generator=generator)
    rows = (torch.arange(h, device=images.device) + dy[:, None])[:, None, :, None]  # n,1,h,1
    cols = (torch.arange(w, device=images.device) + dx[:, None])[:, None, None, :]  # n,1,1,w
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def process_shard() -> tuple[int, int]:
    """``(rank, world_size)`` of this process in torch.distributed, or ``(0, 1)`` outside it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resize_batch(images: Tensor, size: int) -> Tensor:
    """Bilinear, antialiased resize of a batch to ``size`` x ``size`` (a no-op at the current size)."""
    if images.shape[-2:] == (size, size):
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)


class ResidentLoader:
    """Batches of (normalized float images, labels) from uint8 tensors already on the device.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a run can resume mid-schedule. Under
    torch.distributed (or given ``rank`` and ``world_size``) each rank serves a disjoint share of it.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], train: bool, seed: int = 0, flip: bool = False,
                 alternating_flip: bool = False, translate_px: int = 0, cutout_px: int = 0,
                 channels_last: bool = False, drop_last: bool | None = None,
                 dtype: torch.dtype = torch.float32, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.images, self.labels = images, labels
        if rank is None and world_size is None:
            rank, world_size = process_shard()
        self.rank, self.world_size = 0 if rank is None else rank, 1 if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.flip, self.translate_px = flip and train, translate_px if train else 0
        self.cutout_px = cutout_px if train else 0
        self.size: int | None = None  # when set, batches are emitted at size x size (progressive resizing)
        self.channels_last, self.dtype = channels_last, dtype
        self.drop_last = train if drop_last is None else drop_last
        device = self._device = images.device
        # Fused normalization: x * scale + shift, with per-channel constants in pixel units.
        self._scale = torch.tensor([1 / (255 * s) for s in std], device=device).view(1, -1, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
        self._gen = torch.Generator(device=device)
        self._flip_base = None
        if self.flip and alternating_flip:
            self._flip_base = torch.rand(len(labels), device=device,
                                         generator=torch.Generator(device=device).manual_seed(seed)) < 0.5

    def _batch_slices(self) -> range:
        """The chunks of ``batch_size`` positions in the epoch's order that are this rank's batches.

        Batch i of rank r is chunk ``i * world_size + r``: one step of all ranks together consumes a
        contiguous stretch of the order, as a single process with a ``world_size`` times larger batch
        would. With drop_last every rank gets ``n // (batch_size * world_size)`` batches and the tail
        of the order is dropped; without it every example is served once and ranks differ by at most
        one batch.
        """
        n, chunk = len(self.labels), self.batch_size
        total = n // (chunk * self.world_size) * self.world_size if self.drop_last else -(-n // chunk)
        return range(self.rank, total, self.world_size)

    def _slice(self, chunk: int) -> slice:
        return slice(chunk * self.batch_size, min((chunk + 1) * self.batch_size, len(self.labels)))

    def __len__(self) -> int:
        return len(self._batch_slices())

    @property
    def num_examples(self) -> int:
        return sum(s.stop - s.start for s in map(self._slice, self._batch_slices()))

    def epoch_order(self, epoch: int) -> Tensor | None:
        """The permutation of epoch ``epoch`` (None when not shuffling), the same on every rank.

        It seeds the augmentation generator too; with several ranks that generator is then reseeded
        per rank, so the ranks do not draw the same flips and shifts for their different images.
        """
        if not self.train:
            return None
        self._gen.manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.labels), device=self._device, generator=self._gen)
        if self.world_size > 1:
            self._gen.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + self.rank)
        return order

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = self.epoch_order(epoch)
        for chunk in self._batch_slices():
            idx = self._slice(chunk) if order is None else order[self._slice(chunk)]
            x, y = self.images[idx], self.labels[idx]
            flips = None if self._flip_base is None else alternating_flip_mask(self._flip_base[idx], epoch)
            yield self.transform(x, flips), y

    def transform(self, x: Tensor, flips: Tensor | None = None) -> Tensor:
        """Normalize and augment a uint8 batch; ``flips`` (a bool per image) replaces random flips."""
        x = torch.addcmul(self._shift, x.to(torch.float32), self._scale)
        if flips is not None:
            x = torch.where(flips[:, None, None, None], x.flip(3), x)
        elif self.flip:
            x = flip_batch(x, self._gen)
        if self.translate_px:
            x = translate_batch(x, self.translate_px, self._gen)
        if self.cutout_px:
            x = cutout_batch(x, self.cutout_px, self._gen)
        if self.size is not None:
            x = resize_batch(x, self.size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.to(self.dtype) if self.dtype != torch.float32 else x
