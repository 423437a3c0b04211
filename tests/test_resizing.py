import pytest
import torch

from speedrun.config import DataConfig
from speedrun.data.loader import ResidentLoader, resize_batch
from speedrun.techniques.resizing import ProgressiveResize, progressive_size, progressive_sizes


def test_progressive_size_schedule():
    kw = dict(native=32, start_scale=0.5, full_frac=0.2)
    assert progressive_size(0.0, **kw) == 16
    assert progressive_size(0.4, **kw) == 24  # halfway up the ramp that ends at 0.8
    assert progressive_size(0.8, **kw) == 32 and progressive_size(1.0, **kw) == 32
    sizes = [progressive_size(p / 100, **kw) for p in range(101)]
    assert sizes == sorted(sizes) and all(s % 4 == 0 for s in sizes)
    assert progressive_size(0.0, native=28, start_scale=1.0, full_frac=0.0) == 28


@pytest.mark.parametrize("native, start_scale, full_frac", [
    (32, 0.5, 0.2), (28, 0.5, 0.25), (128, 0.5, 0.2), (224, 0.57, 0.1), (30, 0.33, 0.0), (28, 1.0, 0.0)])
def test_progressive_sizes_lists_exactly_the_sizes_the_schedule_visits(native, start_scale, full_frac):
    kw = dict(native=native, start_scale=start_scale, full_frac=full_frac)
    visited = sorted({progressive_size(p / 20_000, **kw) for p in range(20_001)})
    assert progressive_sizes(**kw) == visited


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


def test_scaled_batch_size_keeps_pixels_per_step_up_to_the_cap():
    from speedrun.techniques.resizing import scaled_batch_size

    assert scaled_batch_size(100, size=28, native=28) == 100
    assert scaled_batch_size(100, size=20, native=28) == round(100 * (28 / 20) ** 2)  # 196
    assert scaled_batch_size(100, size=12, native=28) == 400  # (28/12)^2 = 5.4, capped at 4x
    assert scaled_batch_size(100, size=12, native=28, max_factor=8) == round(100 * (28 / 12) ** 2)


def test_batch_scaling_follows_the_size_and_the_schedule_counts_images():
    from speedrun.config import ScheduleConfig
    from speedrun.techniques.resizing import scaled_batch_size
    from speedrun.techniques.schedules import LRSchedule, one_cycle
    from speedrun.train.loop import FitState, fit

    torch.manual_seed(0)
    n, base, native = 512, 16, 28
    loader = ResidentLoader(torch.randint(0, 256, (n, 1, native, native), dtype=torch.uint8),
                            torch.randint(0, 3, (n,)), batch_size=base, mean=(0.5,), std=(0.25,), train=True)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    optimizer = torch.optim.SGD([{"params": model.parameters(), "peak_lr": 0.2}], lr=0.2)
    steps = 2 * n // base  # two epochs of the base batch
    state = FitState(model=model, optimizer=optimizer, loss_fn=torch.nn.functional.cross_entropy, loader=loader,
                     schedule_steps=steps, max_steps=steps, step_images=base)
    cfg = DataConfig(resize_start_scale=0.5, resize_full_frac=0.25, resize_scale_batch=True)
    schedule = ScheduleConfig(kind="one-cycle", warmup_frac=0.25, start_factor=0.1)
    seen = []

    class Record:
        def before_batch(self, state):
            seen.append((state.images_seen, state.inputs.shape[-1], len(state.targets),
                         state.optimizer.param_groups[0]["lr"]))

    fit(state, [ProgressiveResize(cfg, native=native), LRSchedule(schedule), Record()])
    assert state.outcome == "completed" and state.progress == 1.0
    assert steps * base <= state.images_seen < steps * base + 4 * base  # stops within the last batch
    assert len(seen) < steps  # fewer, larger steps
    pixels = 0.0
    for images_before, size, batch, lr in seen:
        progress = images_before / (steps * base)  # the schedule is a function of the images seen
        assert size == progressive_size(progress, native=native, start_scale=0.5, full_frac=0.25)
        assert batch == scaled_batch_size(base, size=size, native=native)
        assert lr == pytest.approx(0.2 * batch / base * one_cycle(progress, warmup_frac=0.25, start_factor=0.1))
        pixels += (size / native) ** 2 * batch
    assert {b for _, s, b, _ in seen if s == native} == {base} and max(b for *_, b, _ in seen) > 2 * base
    assert state.extras["pixel_fraction"] == pytest.approx(pixels / state.images_seen)
    assert loader.batch_size == base and optimizer.param_groups[0]["peak_lr"] == 0.2  # restored after the fit
