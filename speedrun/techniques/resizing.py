"""Progressive resizing (fast.ai's ImageNet runs, Google's TPU entry, Composer): small images early,
full size at the end. The loader emits the scheduled size directly; no decode at full size is
redone, since the resident uint8 set is resized a batch at a time on the device."""
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


class ProgressiveResize:
    """Sets the loader's output size from the schedule before the first batch and after every step.

    It also records, as ``state.extras["pixel_fraction"]``, the mean of (size / native)^2 over the
    steps taken: convolution FLOPs scale with pixels, so FLOP and MFU figures counted at full size
    are scaled by it.
    """

    def __init__(self, cfg: DataConfig, native: int) -> None:
        self.cfg, self.native = cfg, native
        self._pixel_sum, self._steps, self._size = 0.0, 0, native

    def _update(self, state) -> None:
        self._size = progressive_size(state.progress, native=self.native,
                                      start_scale=self.cfg.resize_start_scale, full_frac=self.cfg.resize_full_frac)
        state.loader.size = None if self._size == self.native else self._size

    def before_fit(self, state) -> None:
        self._update(state)

    def after_step(self, state) -> None:
        self._pixel_sum += (self._size / self.native) ** 2  # the size this step trained at
        self._steps += 1
        self._update(state)

    def after_fit(self, state) -> None:
        state.loader.size = None
        if self._steps:
            state.extras["pixel_fraction"] = self._pixel_sum / self._steps
