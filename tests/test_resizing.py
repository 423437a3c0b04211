import pytest
import torch

from speedrun.config import DataConfig
from speedrun.data.loader import ResidentLoader, resize_batch
from speedrun.techniques.resizing import ProgressiveResize, progressive_size


def test_progressive_size_schedule():
    kw = dict(native=32, start_scale=0.5, full_frac=0.2)
    assert progressive_size(0.0, **kw) == 16
    assert progressive_size(0.4, **kw) == 24  # halfway up the ramp that ends at 0.8
    assert progressive_size(0.8, **kw) == 32 and progressive_size(1.0, **kw) == 32
    sizes = [progressive_size(p / 100, **kw) for p in range(101)]
    assert sizes == sorted(sizes) and all(s % 4 == 0 for s in sizes)
    assert progressive_size(0.0, native=28, start_scale=1.0, full_frac=0.0) == 28


def test_resize_batch_matches_interpolate_and_keeps_native_batches():
    x = torch.randn(3, 2, 28, 28)
    expected = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True,
                                               align_corners=False)
    assert torch.allclose(resize_batch(x, 16), expected) and resize_batch(x, 28) is x


def test_hook_drives_the_loader_size_and_reports_the_pixel_fraction():
    images = torch.zeros((64, 1, 28, 28), dtype=torch.uint8)
    loader = ResidentLoader(images, torch.zeros(64, dtype=torch.long), batch_size=16, mean=(0.0,), std=(1.0,),
                            train=True)

    class State:
        step, progress, extras = 0, 0.0, {}

    State.loader = loader
    hook = ProgressiveResize(DataConfig(resize_start_scale=0.5, resize_full_frac=0.5), native=28)
    hook.before_fit(State)
    assert loader.size == 16 and next(loader.epoch(0))[0].shape[-1] == 16
    State.progress = 0.5
    hook.after_step(State)  # this step trained at 16 px; the next ones run at full size
    assert loader.size is None and next(loader.epoch(0))[0].shape[-1] == 28
    hook.after_step(State)
    hook.after_fit(State)
    assert State.extras["pixel_fraction"] == pytest.approx(((16 / 28) ** 2 + 1.0) / 2)
