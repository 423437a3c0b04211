"""Progressive resizing (fast.ai's ImageNet runs, Google's TPU entry, Composer): small images early,
full size at the end. The loader emits the scheduled size directly; no decode at full size is
redone, since the resident uint8 set is resized a batch at a time on the device.

fast.ai's ImageNet run also raised the batch size at low resolution: a step then costs about the same
at every size, so the smaller images buy fewer, larger steps instead of more, faster ones, and the LR
follows the batch (linear scaling rule). The schedule counts images, so it is unchanged by this.
"""
from __future__ import annotations

from speedrun.config import DataConfig


def progressive_size(progress: float, *, native: int, start_scale: float, full_frac: float,
                     multiple: int = 4) -> int:
    """Image side at ``progress``: ``start_scale * native`` growing linearly to ``native``, which is
    reached at ``1 - full_frac``; rounded to a multiple of ``multiple`` (at least ``multiple``).

    >>> [progressive_size(p, native=28, start_scale=0.5, full_frac=0.25) for p in (0, 0.375, 0.75, 1)]
    [16, 20, 28, 28]
    """
    ramp_end = 1.0 - full_frac
    if start_scale >= 1.0 or progress >= ramp_end:
        return native
    scale = start_scale + (1.0 - start_scale) * progress / ramp_end
    return min(native, max(multiple, multiple * round(native * scale / multiple)))


def progressive_sizes(*, native: int, start_scale: float, full_frac: float, multiple: int = 4) -> list[int]:
    """Every side ``progressive_size`` can return for these settings, ascending (a compiled model is
    specialised to each input size it meets, so this is how many training graphs torch.compile builds).

    >>> progressive_sizes(native=32, start_scale=0.5, full_frac=0.2)
    [16, 20, 24, 28, 32]
    """
    if start_scale >= 1.0:
        return [native]
    first, last = round(native * start_scale / multiple), round(native / multiple)
    return sorted({min(native, max(multiple, multiple * k)) for k in range(first, last + 1)} | {native})


def scaled_batch_size(batch_size: int, *, size: int, native: int, max_factor: float = 4.0) -> int:
    """The batch at side ``size``: ``batch_size * (native / size)^2``, so that the pixels per step stay
    those of a full-size batch, rounded, and at most ``max_factor`` times ``batch_size`` (the linear
    scaling rule holds over a limited range of batch sizes; Goyal et al. 2017).

    >>> scaled_batch_size(256, size=16, native=28), scaled_batch_size(256, size=8, native=28)
    (784, 1024)
    """
    return round(batch_size * min((native / size) ** 2, max_factor))


class ProgressiveResize:
    """Sets the loader's output size from the schedule before the first batch and after every step.

    With ``cfg.resize_scale_batch`` it also sets the loader's batch size (``scaled_batch_size``, at
    most the training set) and every param group's ``peak_lr`` by the same factor; the fit must then
    count its schedule in images (``FitState.step_images``).

    It records, as ``state.extras["pixel_fraction"]``, the mean of (size / native)^2 over the images
    trained on: convolution FLOPs scale with pixels, so FLOP and MFU figures counted at full size are
    scaled by it.
    """

    def __init__(self, cfg: DataConfig, native: int) -> None:
        self.cfg, self.native = cfg, native
        self._pixel_sum, self._images, self._size = 0.0, 0, native
        self._base_batch, self._batch, self._peaks = 0, 0, []

    def _update(self, state) -> None:
        self._size = progressive_size(state.progress, native=self.native,
                                      start_scale=self.cfg.resize_start_scale, full_frac=self.cfg.resize_full_frac)
        state.loader.size = None if self._size == self.native else self._size
        if self.cfg.resize_scale_batch:
            self._batch = min(scaled_batch_size(self._base_batch, size=self._size, native=self.native),
                              len(state.loader.labels))
            state.loader.batch_size = self._batch
            for group, peak in zip(state.optimizer.param_groups, self._peaks):
                group["peak_lr"] = peak * self._batch / self._base_batch

    def before_fit(self, state) -> None:
        self._base_batch = self._batch = state.loader.batch_size
        if self.cfg.resize_scale_batch:
            self._peaks = [group["peak_lr"] for group in state.optimizer.param_groups]
        self._update(state)

    def state_dict(self) -> dict:
        # The loader's size and batch size are the loader's own state (it is checkpointed too).
        return {"pixel_sum": self._pixel_sum, "images": self._images, "size": self._size,
                "base_batch": self._base_batch, "batch": self._batch, "peaks": self._peaks}

    def load_state_dict(self, saved: dict, state) -> None:
        self._pixel_sum, self._images, self._size = saved["pixel_sum"], saved["images"], saved["size"]
        self._base_batch, self._batch, self._peaks = saved["base_batch"], saved["batch"], list(saved["peaks"])

    def after_step(self, state) -> None:
        self._pixel_sum += (self._size / self.native) ** 2 * self._batch  # the batch this step trained on
        self._images += self._batch
        self._update(state)

    def after_fit(self, state) -> None:
        state.loader.size = None
        if self.cfg.resize_scale_batch:
            state.loader.batch_size = self._base_batch
            for group, peak in zip(state.optimizer.param_groups, self._peaks):
                group["peak_lr"] = peak
        if self._images:
            state.extras["pixel_fraction"] = self._pixel_sum / self._images
