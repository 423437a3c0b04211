"""A streaming loader for prepared sets larger than device memory, and the choice between it and the resident one.

The uint8 cache stays memory-mapped on the host; a background thread gathers each batch's rows
(numpy's gather releases the GIL), into pinned memory on CUDA, and starts its copy to the device on
a side stream, a few batches ahead. Normalization and augmentation then run on the device exactly as
in ``ResidentLoader``, whose order, sharding and transform are reused unchanged, so for the same seed
both loaders yield the same batches.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from speedrun.data.loader import ResidentLoader, alternating_flip_mask

RESIDENT_FRACTION = 0.5  # "fits comfortably": the rest is left to the model, its activations and the OS


def available_memory(device: torch.device) -> int:
    """Bytes free for a resident set: free CUDA memory, or the kernel's MemAvailable estimate on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return sys.maxsize  # unknown: keep the resident default


def choose_loader(mode: str, nbytes: int, device: torch.device) -> str:
    """``resident`` or ``stream``; ``auto`` is resident when the uint8 set (``nbytes``) takes at most
    ``RESIDENT_FRACTION`` of the memory available on ``device``."""
    if mode != "auto":
        return mode
    return "resident" if nbytes <= RESIDENT_FRACTION * available_memory(device) else "stream"


class Prefetcher:
    """Iterates ``read(item)`` for each item, computed by a background thread at most ``depth`` ahead.

    ``close()`` (also on early exit from iteration) stops the thread within one ``read``; an
    exception in ``read`` is raised in the consumer. The thread is a daemon and never blocks
    indefinitely on a full queue, so an abandoned prefetcher cannot hang the interpreter.
    """

    _END = object()

    def __init__(self, read: Callable[[Any], Any], items: Iterable[Any], *, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(read, items), name="speedrun-prefetch", daemon=True)
        self.thread.start()

    def _run(self, read: Callable[[Any], Any], items: Iterable[Any]) -> None:
        try:
            for item in items:
                if self._stop.is_set():
                    return
                self._put((True, read(item)))
        except BaseException as e:  # handed to the consumer
            self._put((False, e))
            return
        self._put((True, self._END))

    def _put(self, value: tuple[bool, Any]) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.05)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[Any]:
        try:
            while True:
                ok, value = self._queue.get()
                if not ok:
                    raise value
                if value is self._END:
                    return
                yield value
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        while True:  # free the batches already made
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self.thread is not threading.current_thread():
            self.thread.join()


class StreamLoader(ResidentLoader):
    """``ResidentLoader``'s batches, read from host (memory-mapped) uint8 arrays instead of device tensors.

    ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64 are numpy arrays, typically
    ``load_prepared(directory, mmap=True)``'s. Options are ResidentLoader's, plus the ``device`` the
    batches go to and how many batches are read ahead (``prefetch``).

    >>> data = load_prepared(prepared.directory, mmap=True)  # doctest: +SKIP
    >>> loader = StreamLoader(data.train_images, data.train_labels, device="cuda", batch_size=512,
    ...                       mean=data.mean, std=data.std, train=True, flip=True)  # doctest: +SKIP
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, device: torch.device | str = "cpu",
                 prefetch: int = 4, **options: Any) -> None:
        device = torch.device(device)
        # ResidentLoader reads only the device and the count from its tensors: stride-0 stand-ins of one
        # image and one label give it both without allocating the set.
        shape = tuple(images.shape[1:])
        stand_in = torch.zeros((1, *shape), dtype=torch.uint8, device=device).expand(len(images), *shape)
        super().__init__(stand_in, torch.zeros(1, dtype=torch.long, device=device).expand(len(labels)), **options)
        self.images, self.labels = images, labels
        self.prefetch = prefetch
        self._label_dtype = torch.from_numpy(np.empty(0, labels.dtype)).dtype  # as torch.as_tensor would give
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order, start = self._begin(epoch)  # on the device, from the same generator as the resident loader
        host_order = None if order is None else order.cpu().numpy()
        # Fixed for the epoch: the reads run ahead (no batch scaling here).
        batches = list(self._positions(start))
        slices, positions = [chunk for chunk, _ in batches], [after for _, after in batches]
        rows = [np.arange(s.start, s.stop) if host_order is None else host_order[s] for s in slices]
        feed = Prefetcher(self._read, rows, depth=self.prefetch)
        try:
            for s, after, (x, y, ready) in zip(slices, positions, feed):
                if ready is not None:  # the copy ran on a side stream: order it before this stream's work
                    current = torch.cuda.current_stream(self._device)
                    current.wait_event(ready)
                    x.record_stream(current)
                    y.record_stream(current)
                idx = s if order is None else order[s]
                flips = None if self._flip_base is None else alternating_flip_mask(self._flip_base[idx], epoch)
                x = self.transform(x, flips)
                self._position = after
                yield x, y
        finally:
            feed.close()

    def sample(self, count: int) -> Tensor:
        """``ResidentLoader.sample``'s draw (the same images for the same seed), read from the host arrays."""
        gen = torch.Generator(device=self._device).manual_seed(self.seed)
        rows = torch.randperm(len(self.images), device=self._device, generator=gen)[:count].cpu().numpy()
        x = torch.from_numpy(np.take(self.images, rows, axis=0)).to(self._device)
        return torch.addcmul(self._shift, x.to(torch.float32), self._scale)

    def example(self, count: int) -> Tensor:
        """``ResidentLoader.example``, read from the host arrays."""
        x = torch.from_numpy(np.array(self.images[:count])).to(self._device)
        return torch.addcmul(self._shift, x.to(torch.float32), self._scale)

    def _read(self, rows: np.ndarray) -> tuple[Tensor, Tensor, torch.cuda.Event | None]:
        """In the prefetch thread: gather ``rows`` (into pinned memory on CUDA) and start the transfer."""
        pin = self._copy_stream is not None
        x = torch.empty((len(rows), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        y = torch.empty(len(rows), dtype=self._label_dtype, pin_memory=pin)
        # mode="clip": with the default "raise", numpy gathers into a temporary and copies it again.
        np.take(self.images, rows, axis=0, out=x.numpy(), mode="clip")
        np.take(self.labels, rows, axis=0, out=y.numpy(), mode="clip")
        if not pin:
            return x, y, None
        with torch.cuda.stream(self._copy_stream):
            x, y = x.to(self._device, non_blocking=True), y.to(self._device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return x, y, ready
