"""Crops from images of varying sizes: random-resized crops and the evaluation transform against per-image
references, the crop loader (order, flips, progressive sizes, threads, sharding), and files decoded on access."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from speedrun.data.crops import (CropLoader, centre_views, crop_resize_each, gather_windows, random_views, resample,
                                 resized_side)
from speedrun.data.imageset import RaggedImages


def _images(sizes, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (channels, h, w), dtype=np.uint8) for h, w in sizes]


# Shrinking and enlarging, portrait and landscape, one image smaller than the crop, a 1-pixel-wide one.
SIZES = [(40, 60), (60, 40), (33, 47), (12, 9), (50, 50), (7, 1), (64, 90)]


def _resize(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    x = torch.from_numpy(image)[None].float()
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _both_ways(images, views, out, flips=None):
    """The batched matmuls (a device's way) and per-image uint8 interpolation (a CPU's), as floats."""
    tensors = [torch.from_numpy(im) for im in images]
    matmul = resample(gather_windows(tensors, views.window), views, out, flips)
    each = crop_resize_each(tensors, views, out).float()
    if flips is not None:
        each[torch.as_tensor(flips)] = each[torch.as_tensor(flips)].flip(-1)
    return matmul, each


@pytest.mark.parametrize("out", [16, 24, 80])
def test_random_resized_crops_match_cropping_each_stored_image_and_resizing_it(out):
    images = _images(SIZES)
    sizes = np.array([im.shape[1:] for im in images])
    views = random_views(sizes, out, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=torch.Generator().manual_seed(0))
    flips = np.arange(len(images)) % 2 == 1
    matmul, each = _both_ways(images, views, out, flips)
    for i, image in enumerate(images):
        top, left, h, w = views.window[i]
        assert 0 <= top and 0 <= left and top + h <= sizes[i, 0] and left + w <= sizes[i, 1]
        reference = _resize(image[:, top:top + h, left:left + w], (out, out))
        if flips[i]:
            reference = reference.flip(-1)
        assert torch.allclose(matmul[i], reference, atol=2e-3), i  # pixel units, 0..255
        assert (each[i] - reference).abs().max() < 1.01, i  # uint8 fixed point: rounding


def test_random_crops_are_drawn_from_each_images_own_size():
    sizes = np.array([[40, 400]] * 2000 + [[400, 40]] * 2000)
    views = random_views(sizes, 8, scale=(0.5, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(1))
    top, left, h, w = views.window.T
    assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all()
    wide, tall = slice(0, 2000), slice(2000, None)
    assert left[wide].max() > 300 and top[wide].max() <= 0 and top[tall].max() > 300  # the whole picture is used


@pytest.mark.parametrize("size,crop_frac", [(32, 0.875), (24, 1.0), (64, 0.875)])  # shrink; no margin; enlarge
def test_evaluation_crop_matches_resize_then_centre_crop_per_image(size, crop_frac):
    images = _images(SIZES, seed=1)
    views = centre_views(np.array([im.shape[1:] for im in images]), size, crop_frac)
    matmul, each = _both_ways(images, views, size)
    side = resized_side(size, crop_frac)
    for i, image in enumerate(images):
        h, w = image.shape[1:]  # torchvision: Resize(side) then CenterCrop(size)
        rh, rw = (side, int(side * w / h)) if h <= w else (int(side * h / w), side)
        resized = _resize(image, (rh, rw))
        top, left = int(round((rh - size) / 2)), int(round((rw - size) / 2))
        reference = resized[:, top:top + size, left:left + size]
        assert torch.allclose(matmul[i], reference, atol=2e-3), (i, (h, w))
        assert (each[i] - reference).abs().max() < 1.01, (i, (h, w))


def test_ragged_images_round_trip_through_the_buffer():
    images = _images(SIZES, seed=2)
    ragged = RaggedImages.from_list(images)
    assert len(ragged) == len(images) and ragged.nbytes == sum(im.size for im in images) == ragged.data.size
    for i, image in enumerate(images):
        assert np.array_equal(ragged[i], image)
    on_device = ragged.to("cpu")
    assert isinstance(on_device.data, torch.Tensor)
    assert all(torch.equal(on_device[i], torch.from_numpy(im)) for i, im in enumerate(images))
    assert [tuple(s) for s in ragged.sizes] == SIZES


def _loader(images, **kw):
    ragged = RaggedImages.from_list(images)
    labels = np.arange(len(images)) % 3
    options = dict(size=16, batch_size=4, mean=(0.5,) * 3, std=(0.25,) * 3, seed=3)
    return CropLoader(ragged, labels, **{**options, **kw})


def test_crop_loader_draws_new_crops_each_epoch_and_repeats_them_for_a_seed():
    images = _images([(30 + i, 50 - i) for i in range(10)], seed=3)
    loader = _loader(images, train=True, flip=True, rrc_scale=(0.25, 1.0))
    first = [x for x, _ in loader.epoch(0)]
    again = [x for x, _ in _loader(images, train=True, flip=True, rrc_scale=(0.25, 1.0)).epoch(0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    second = [x for x, _ in loader.epoch(1)]
    assert not torch.equal(first[0], second[0])
    assert [x.shape for x in first] == [(4, 3, 16, 16)] * 2  # drop_last: 10 images make 2 batches of 4
    loader.size = 8  # progressive resizing
    assert next(loader.epoch(0))[0].shape == (4, 3, 8, 8)


def test_crop_loader_labels_follow_the_images_and_evaluation_is_deterministic():
    images = _images([(20, 20 + i) for i in range(9)], seed=4)
    for i, image in enumerate(images):
        image[:] = i * 20  # an image's label is readable from its pixels
    loader = _loader(images, train=True, flip=True, rrc_scale=(0.3, 1.0))
    for x, y in loader.epoch(2):
        pixel = (x[:, 0, 8, 8] * 0.25 + 0.5) * 255  # undo the normalization
        assert torch.equal((pixel / 20).round().long() % 3, y)
    test = _loader(images, train=False, batch_size=5)
    batches = list(test.epoch(0))
    assert [len(y) for _, y in batches] == [5, 4] and torch.equal(torch.cat([y for _, y in batches]),
                                                                  torch.arange(9) % 3)
    assert torch.equal(batches[0][0], next(test.epoch(7))[0])


def test_prefetch_thread_and_batched_resampling_give_the_same_batches():
    images = _images([(25 + i % 7, 40 - i % 5) for i in range(24)], seed=5)
    options = dict(train=True, flip=True, rrc_scale=(0.2, 1.0), batch_size=5)
    inline = [x for x, _ in _loader(images, **options).epoch(1)]
    threaded = [x for x, _ in _loader(images, prefetch=3, workers=2, **options).epoch(1)]
    assert len(inline) == 4 and all(torch.equal(a, b) for a, b in zip(inline, threaded))
    batched = [x for x, _ in _loader(images, batched=True, **options).epoch(1)]
    assert all((a - b).abs().max() < 1.01 / (0.25 * 255) for a, b in zip(inline, batched))  # uint8 rounding


def test_crops_made_in_threads_under_inference_mode_evaluate():
    from speedrun.train.hooks import evaluate

    images = _images([(20 + i % 5, 30) for i in range(20)], seed=10)
    loader = _loader(images, train=False, batch_size=10, workers=2)  # 10 images a batch: the pool's threads
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    accuracy, loss = evaluate(model, loader)  # torch.inference_mode(): thread-local, the threads must follow
    assert 0 <= accuracy <= 1 and loss > 0
    with torch.inference_mode():
        assert torch.equal(next(loader.epoch(0))[0], next(_loader(images, train=False, batch_size=10).epoch(0))[0])


def test_alternating_flip_mirrors_each_image_in_alternate_epochs():
    images = _images([(16, 16)] * 8, seed=6)
    loader = _loader(images, train=True, flip=True, alternating_flip=True, batch_size=8, size=16, crop_frac=1.0)
    (a, _), (b, _) = next(loader.epoch(0)), next(loader.epoch(1))
    order_a, order_b = loader.epoch_order(0), loader.epoch_order(1)
    by_image_a, by_image_b = a[torch.argsort(order_a)], b[torch.argsort(order_b)]
    assert torch.allclose(by_image_a, by_image_b.flip(-1), atol=1e-4)  # the whole image, mirrored in turn


def test_shards_split_the_epoch_between_ranks():
    images = _images([(20, 24)] * 16, seed=7)
    seen = []
    for rank in range(2):
        loader = _loader(images, train=True, rrc_scale=(0.5, 1.0), rank=rank, world_size=2)
        seen.append(torch.cat([y for _, y in loader.epoch(0)]))
    assert len(seen[0]) == len(seen[1]) == 8


def test_sample_and_example_are_centre_crops_at_the_crop_size():
    images = _images([(30, 40), (50, 20), (10, 12)], seed=8)
    loader = _loader(images, train=True, rrc_scale=(0.1, 1.0), size=12)
    assert loader.sample(10).shape == (3, 3, 12, 12) and loader.example(2).shape == (2, 3, 12, 12)
    assert loader.image_size == (12, 12)


def test_fixres_evaluates_at_the_test_resolution_and_its_ablation_at_the_training_size(tmp_path):
    from speedrun.data.sources import prepare, resolve
    from speedrun.recipes import get_recipe
    from speedrun.techniques.registry import TECHNIQUES, without
    from speedrun.train.run import build_loaders
    from tests.conftest import write_image

    rng = np.random.default_rng(9)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                write_image(tmp_path / "t" / split / cls / f"{i}.png", rng.integers(0, 256, (30 + i, 44, 3)))
    recipe = get_recipe("imagewoof").override({"data.max_size": 32, "data.crop_size": 16, "eval.crop_size": 24,
                                               "eval.crop_frac": 0.75, "eval.batch_size": 4})
    assert TECHNIQUES["fixres"].enabled(recipe)
    plain = without(recipe, ["fixres"])
    assert not TECHNIQUES["fixres"].enabled(plain) and plain.eval.crop_size == 0
    assert [t for t in TECHNIQUES.values() if t.enabled(recipe) != t.enabled(plain)] == [TECHNIQUES["fixres"]]
    directory = prepare(resolve(str(tmp_path / "t"), layout="aspect", max_size=32)).directory
    sizes = {}
    for r in (recipe, plain):
        loaders = build_loaders(r, directory, torch.device("cpu"), seed=0)
        images, train, test, kind = loaders.images, loaders.train, loaders.test, loaders.kind
        assert kind == "resident" and images.image_size == (16, 16) and train.image_size == (16, 16)
        x, _ = next(test.epoch(0))
        sizes[r.eval.crop_size] = x.shape[-1]
        side = resized_side(x.shape[-1], r.eval.crop_frac)
        first = test.store[0].numpy()
        h, w = first.shape[1:]  # 30x44: resize to side x int(side * 44 / 30), then the centre crop
        resized = _resize(first, (side, int(side * w / h)))
        top, left = round((side - x.shape[-1]) / 2), round((resized.shape[-1] - x.shape[-1]) / 2)
        reference = resized[:, top:top + x.shape[-1], left:left + x.shape[-1]]
        pixels = x[0] * torch.tensor(images.std)[:, None, None] * 255 + torch.tensor(images.mean)[:, None, None] * 255
        assert (pixels - reference).abs().max() < 1.01
    assert sizes == {24: 24, 0: 16}  # the test resolution; without FixRes, the training size
