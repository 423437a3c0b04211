"""Augmentations: random-resized crop, mixup/CutMix (with label smoothing), translation TTA, batch scaling."""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from speedrun.data.loader import (ResidentLoader, crop_resize_batch, random_resized_crop_batch,
                                  sample_crop_boxes)


# ---------------------------------------------------------------- random-resized crop

def _reference_crop_resize(images, boxes, size):
    """Per image: slice the box, then F.interpolate (bilinear, antialiased) to ``size``."""
    out = []
    for image, (top, left, h, w) in zip(images, boxes.tolist()):
        crop = image[None, :, top:top + h, left:left + w]
        out.append(F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(out)


@pytest.mark.parametrize("size", [(12, 12), (20, 30), (45, 40)])  # shrinking, mixed, enlarging
def test_crop_resize_batch_matches_a_per_image_reference(size):
    torch.manual_seed(0)
    images = torch.rand(24, 3, 25, 35) * 255
    gen = torch.Generator().manual_seed(1)
    boxes = sample_crop_boxes(24, 25, 35, scale=(0.05, 1.0), ratio=(0.3, 3.0), generator=gen)
    boxes[0] = torch.tensor([0, 0, 25, 35])  # the whole image
    boxes[1] = torch.tensor([24, 34, 1, 1])  # a single pixel in the corner
    out = crop_resize_batch(images, boxes, size)
    assert out.shape == (24, 3, *size)
    assert torch.allclose(out, _reference_crop_resize(images, boxes, size), atol=1e-3)  # pixel units, 0..255


def test_crop_boxes_stay_in_the_image_and_within_the_area_and_ratio_ranges():
    height, width, n = 200, 300, 4000
    scale, ratio = (0.2, 0.9), (0.5, 2.0)
    boxes = sample_crop_boxes(n, height, width, scale=scale, ratio=ratio,
                              generator=torch.Generator().manual_seed(0)).double()
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # Sides are rounded to whole pixels: bound the drawn (continuous) box by the rounded one +- half a pixel.
    assert ((w - 0.5) * (h - 0.5) <= scale[1] * height * width).all()
    assert ((w + 0.5) * (h + 0.5) >= scale[0] * height * width).all()
    assert ((w - 0.5) / (h + 0.5) <= ratio[1]).all() and ((w + 0.5) / (h - 0.5) >= ratio[0]).all()
    # ... and the draws cover both ranges and every position.
    area, log_ratio = w * h / (height * width), torch.log(w / h)
    assert area.min() < scale[0] + 0.02 and area.max() > scale[1] - 0.02
    assert log_ratio.min() < math.log(ratio[0]) + 0.05 and log_ratio.max() > math.log(ratio[1]) - 0.05
    assert abs(float(log_ratio.mean())) < 0.05  # log-uniform on a range symmetric in log
    assert (top == 0).any() and (top + h == height).any() and (left == 0).any() and (left + w == width).any()


def test_crop_boxes_fall_back_to_the_largest_box_when_no_ratio_fits():
    boxes = sample_crop_boxes(200, 16, 16, scale=(0.5, 1.0), ratio=(3.0, 4.0),
                              generator=torch.Generator().manual_seed(0))
    top, left, h, w = boxes.unbind(1)
    assert (w == 16).all() and (top + h <= 16).all() and (left == 0).all()  # full width, as tall as fits


def test_random_resized_crop_is_the_crop_of_the_sampled_boxes():
    images = torch.rand(16, 2, 28, 28)
    out = random_resized_crop_batch(images, (16, 16), scale=(0.3, 1.0), generator=torch.Generator().manual_seed(4))
    boxes = sample_crop_boxes(16, 28, 28, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3),
                              generator=torch.Generator().manual_seed(4))
    assert torch.equal(out, crop_resize_batch(images, boxes, (16, 16)))


def test_loader_crops_to_its_current_size_only_when_training():
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(64)
    kw = dict(batch_size=16, mean=(0.5,), std=(0.25,), seed=0)
    plain = ResidentLoader(images, labels, train=True, **kw)
    full = ResidentLoader(images, labels, train=True, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), **kw)
    assert torch.allclose(next(full.epoch(0))[0], next(plain.epoch(0))[0], atol=1e-5)  # the whole image: identity
    crop = ResidentLoader(images, labels, train=True, rrc_scale=(0.2, 0.5), **kw)
    x, _ = next(crop.epoch(0))
    assert x.shape == (16, 1, 28, 28) and not torch.allclose(x, next(plain.epoch(0))[0])
    crop.size = 16  # progressive resizing: crop and resize in one op
    assert next(crop.epoch(0))[0].shape == (16, 1, 16, 16)
    test = ResidentLoader(images, labels, train=False, rrc_scale=(0.2, 0.5), **kw)
    assert test.rrc_scale is None


# ---------------------------------------------------------------- mixup and CutMix

def test_mixup_matches_a_per_sample_reference():
    from speedrun.techniques.mixing import mixup_batch

    torch.manual_seed(0)
    x, y = torch.randn(7, 3, 5, 6), torch.randint(0, 4, (7,))
    targets = F.one_hot(y, 4).float()
    mixed, soft = mixup_batch(x, targets, 0.7)
    for i in range(7):
        j = (i - 1) % 7
        assert torch.allclose(mixed[i], 0.7 * x[i] + 0.3 * x[j], atol=1e-6)
        expected = torch.zeros(4)
        expected[y[i]] += 0.7
        expected[y[j]] += 0.3
        assert torch.allclose(soft[i], expected)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert mixup_batch(cl, targets, 0.7)[0].is_contiguous(memory_format=torch.channels_last)


def test_cutmix_matches_a_per_sample_reference_and_mixes_targets_by_area():
    import random

    from speedrun.techniques.mixing import cutmix_batch, cutmix_box

    torch.manual_seed(0)
    x, y = torch.randn(5, 2, 10, 8), torch.tensor([0, 1, 2, 1, 3])
    rng = random.Random(3)
    for lam in (0.0, 0.3, 0.6, 0.9, 1.0):
        full_h, full_w = 2 * round(10 * math.sqrt(1 - lam) / 2), 2 * round(8 * math.sqrt(1 - lam) / 2)
        for _ in range(50):
            t, l, h, w = cutmix_box(10, 8, lam, rng)
            assert 0 <= t and 0 <= l and t + h <= 10 and l + w <= 8
            # sides of sqrt(1 - lam) x the image's, shorter only where the box is clipped at an edge
            assert h == full_h or (h < full_h and (t == 0 or t + h == 10))
            assert w == full_w or (w < full_w and (l == 0 or l + w == 8))
    box = (2, 3, 5, 4)
    mixed, soft = cutmix_batch(x, F.one_hot(y, 4).float(), box)
    lam = 1 - 5 * 4 / 80
    for i in range(5):
        j = (i - 1) % 5
        expected = x[i].clone()
        expected[:, 2:7, 3:7] = x[j, :, 2:7, 3:7]
        assert torch.equal(mixed[i], expected)
        target = torch.zeros(4)
        target[y[i]] += lam
        target[y[j]] += 1 - lam
        assert torch.allclose(soft[i], target)


def test_smoothed_cross_entropy_on_mixed_targets_matches_the_formula():
    from speedrun.techniques.label_smoothing import smoothed_cross_entropy
    from speedrun.techniques.mixing import mixup_batch

    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.randint(0, 5, (6,))
    _, soft = mixup_batch(torch.zeros(6, 1, 1, 1), F.one_hot(y, 5).float(), 0.6)
    s, k = 0.1, 5
    log_p = torch.log_softmax(logits, 1)
    expected = 0.0
    for i in range(6):  # by hand: lam * smoothed loss of the image's class + (1 - lam) * its partner's
        a, b = int(y[i]), int(y[i - 1])
        loss_a = -((1 - s) * log_p[i, a] + s / k * log_p[i].sum())
        loss_b = -((1 - s) * log_p[i, b] + s / k * log_p[i].sum())
        expected += (0.6 * loss_a + 0.4 * loss_b) / 6
    assert float(smoothed_cross_entropy(logits, soft, s)) == pytest.approx(float(expected), rel=1e-5)


def test_mix_hook_mixes_with_its_probability_and_keeps_plain_batches():
    from speedrun.techniques.mixing import MixBatch

    class State:
        pass

    def run(hook, n=400):
        kinds = []
        for _ in range(n):
            State.inputs, State.targets = torch.rand(8, 1, 6, 6), torch.randint(0, 3, (8,))
            before = State.inputs
            hook.before_batch(State)
            if State.targets.dtype == torch.long:
                kinds.append("plain")
                assert State.inputs is before
            else:
                assert State.targets.shape == (8, 3) and torch.allclose(State.targets.sum(1), torch.ones(8))
                pasted = (State.inputs == before.roll(1, 0)) & (State.inputs != before)
                kinds.append("cutmix" if pasted.any() else "mixup")
        return kinds

    both = run(MixBatch(3, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5, seed=0))
    assert 150 < both.count("plain") < 250 and 50 < both.count("cutmix") < 150 and 50 < both.count("mixup") < 150
    assert set(run(MixBatch(3, mixup_alpha=0.4, seed=1), 50)) == {"mixup"}
    assert set(run(MixBatch(3, mixup_alpha=0.0, cutmix_alpha=0.0, seed=1), 20)) == {"plain"}


# ---------------------------------------------------------------- test-time augmentation

def _reflect(i: int, n: int) -> int:
    i = abs(i)
    return 2 * (n - 1) - i if i >= n else i


def test_shift_batch_matches_a_per_pixel_reflection_reference():
    from speedrun.techniques.tta import shift_batch

    x = torch.randn(2, 3, 6, 7)
    for dy, dx in [(2, 2), (-2, -2), (1, -3), (0, 2)]:
        out = shift_batch(x, dy, dx)
        expected = torch.empty_like(x)
        for r in range(6):
            for c in range(7):
                expected[..., r, c] = x[..., _reflect(r - dy, 6), _reflect(c - dx, 7)]
        assert torch.equal(out, expected), (dy, dx)
    assert shift_batch(x, 0, 0) is x


def test_tta_logits_average_over_flips_and_shifts():
    from speedrun.techniques.tta import shift_batch, tta_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 5 * 5, 3))
    x = torch.randn(4, 2, 5, 5)
    views = [x, shift_batch(x, 1, 1), shift_batch(x, -1, -1)]
    views += [v.flip(3) for v in views]
    expected = torch.stack([model(v) for v in views]).mean(0)
    assert torch.allclose(tta_logits(model, x, flip=True, translate_px=1), expected, atol=1e-6)
    assert torch.allclose(tta_logits(model, x, translate_px=1), torch.stack([model(v) for v in views[:3]]).mean(0),
                          atol=1e-6)
    assert torch.allclose(tta_logits(model, x, flip=True), (model(x) + model(x.flip(3))) / 2)
    assert torch.equal(tta_logits(model, x), model(x))


def test_evaluate_and_the_evaluator_use_translation_tta():
    from speedrun.measure.clock import Clock
    from speedrun.techniques.tta import tta_logits
    from speedrun.train.hooks import Evaluator, evaluate

    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,))
    loader = ResidentLoader(images, labels, batch_size=16, mean=(0.5,), std=(0.25,), train=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x = torch.cat([b for b, _ in loader.epoch(0)])
    with torch.no_grad():
        logits = tta_logits(model, x, flip=True, translate_px=2)
    accuracy, loss = evaluate(model, loader, tta_flip=True, tta_translate_px=2)
    assert accuracy == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert evaluate(model, loader, tta_flip=True)[1] != pytest.approx(loss)  # the shifts count

    class State:
        step, epoch_float, autocast, extras, eval_model = 1, 0.1, contextlib.nullcontext, {}, None

    State.model = model
    point = Evaluator(loader, clock=Clock().start(), target=None, tta_flip=True, tta_translate_px=2).run(State)
    assert point.accuracy == pytest.approx(accuracy) and point.test_loss == pytest.approx(loss)


def test_inference_latency_runs_every_tta_view():
    from speedrun.measure.latency import inference_latency

    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return x.flatten(1)

    from speedrun.techniques.tta import tta_logits

    model = Counting()
    stats = inference_latency(lambda x: tta_logits(model, x, flip=True, translate_px=1), [torch.rand(1, 1, 4, 4)] * 5,
                              warmup=1)
    assert stats.samples == 5 and len(calls) == 6 * (5 + 1)


# ---------------------------------------------------------------- end to end

def test_a_run_with_every_augmentation_trains(synthetic_dir):
    import speedrun
    from tests.conftest import TINY

    overrides = {**TINY, "train.epochs": "3", "data.rrc_scale": "0.5,1", "data.mixup_alpha": "0.2",
                 "data.cutmix_alpha": "1.0", "data.mix_prob": "0.5", "eval.tta_flip": "true",
                 "eval.tta_translate_px": "1", "data.resize_start_scale": "0.5", "data.resize_full_frac": "0.5"}
    plain = speedrun.train(data=synthetic_dir, store=None, stop_at_target=False, overrides=overrides)
    scaled = speedrun.train(data=synthetic_dir, store=None, stop_at_target=False,
                            overrides={**overrides, "data.resize_scale_batch": "true"})
    for result in (plain, scaled):
        assert result.outcome in ("reached", "budget_exhausted") and result.best_accuracy > 0.5, result.detail
        assert result.epochs == pytest.approx(3.0, abs=0.5)
    assert plain.steps == 3 * (1024 // 128) and scaled.steps < plain.steps  # the same schedule in fewer steps
    assert scaled.images_seen >= plain.images_seen
