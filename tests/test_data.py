import numpy as np
import pytest
import torch

from speedrun.data import DataError, ResidentLoader, flip_batch, load_prepared, prepare, resolve, translate_batch
from speedrun.data.idx import IdxError, read_idx
from tests.conftest import synthetic_images, write_idx, write_idx_dataset


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_idx_round_trip(tmp_path, name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / name, array)), array)


def test_idx_rejects_truncated_and_foreign_files(tmp_path):
    path = write_idx(tmp_path / "a.idx", np.zeros((4, 5, 5), np.uint8))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(IdxError, match="truncated"):
        read_idx(path)
    (tmp_path / "b.idx").write_bytes(b"\x89PNG not idx")
    with pytest.raises(IdxError, match="bad magic"):
        read_idx(tmp_path / "b.idx")
    (tmp_path / "c.idx.gz").write_bytes(b"not gzip at all")
    with pytest.raises(IdxError, match="cannot read"):
        read_idx(tmp_path / "c.idx.gz")


def test_resolve_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"dataset not found: {tmp_path / 'nope'}"):
        resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="unrecognised dataset layout"):
        resolve(str(tmp_path / "empty"))


def test_prepare_caches_once_and_reloads(synthetic_dir):
    source = resolve(str(synthetic_dir))
    first = prepare(source)
    assert first.built and first.prepare_s > 0
    again = prepare(source)
    assert not again.built and again.prepare_s == 0 and again.directory == first.directory
    data = load_prepared(first.directory)
    assert data.train_images.shape == (1024, 1, 28, 28) and data.test_images.shape == (256, 1, 28, 28)
    assert data.num_classes == 4 and data.train_labels.dtype == np.int64
    pixels = data.train_images.astype(np.float64) / 255
    assert data.mean[0] == pytest.approx(pixels.mean()) and data.std[0] == pytest.approx(pixels.std())


def test_changed_source_is_prepared_again(synthetic_dir):
    first = prepare(resolve(str(synthetic_dir)))
    train_x, train_y = synthetic_images(512, seed=7)
    write_idx(synthetic_dir / "train-images-idx3-ubyte.gz", train_x)
    write_idx(synthetic_dir / "train-labels-idx1-ubyte.gz", train_y)
    second = prepare(resolve(str(synthetic_dir)))
    assert second.built and second.directory != first.directory
    assert load_prepared(second.directory).train_images.shape[0] == 512


def test_mismatched_counts_are_a_data_error(tmp_path):
    x, y = synthetic_images(10)
    write_idx_dataset(tmp_path / "bad", x, y[:5], x, y)
    with pytest.raises(DataError, match="do not match"):
        prepare(resolve(str(tmp_path / "bad")))


def test_interrupted_prepare_leaves_no_cache(synthetic_dir, monkeypatch, isolated_home):
    source = resolve(str(synthetic_dir))
    real_save = np.save
    calls = []

    def failing_save(path, array):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(path, array)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        prepare(source)
    monkeypatch.setattr(np, "save", real_save)
    cache = isolated_home / "cache"
    assert [p.name for p in cache.iterdir()] == []  # neither the temporary folder nor a half cache
    assert prepare(source).built


# ---- batched augmentation against per-sample references

def test_flip_batch_mirrors_exactly_the_chosen_images():
    x = torch.randn(64, 2, 5, 7)
    gen = torch.Generator().manual_seed(3)
    out = flip_batch(x, gen)
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_translate_batch_matches_pad_and_crop_per_image():
    x = torch.randn(32, 3, 6, 8)
    p = 2
    gen = torch.Generator().manual_seed(0)
    out = translate_batch(x, p, gen)
    padded = torch.nn.functional.pad(x, (p,) * 4, mode="reflect")
    shifts = set()
    for i in range(len(x)):
        crops = {(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 8])}
        assert crops, f"image {i} is not a crop of its padded self"
        shifts |= crops
    assert len(shifts) > 5  # offsets differ between images
    assert translate_batch(x, 0) is x


def test_loader_normalizes_and_orders_by_seed_and_epoch():
    images = torch.randint(0, 256, (100, 1, 4, 4), dtype=torch.uint8)
    labels = torch.arange(100)
    mk = lambda seed: ResidentLoader(images, labels, batch_size=32, mean=(0.5,), std=(0.25,), train=True, seed=seed)
    loader = mk(1)
    assert len(loader) == 3 and loader.num_examples == 96  # drop_last for training
    order0 = torch.cat([y for _, y in loader.epoch(0)])
    assert torch.equal(order0, torch.cat([y for _, y in mk(1).epoch(0)]))
    assert not torch.equal(order0, torch.cat([y for _, y in loader.epoch(1)]))
    assert not torch.equal(order0, torch.cat([y for _, y in mk(2).epoch(0)]))
    x, y = next(loader.epoch(0))
    expected = (images[y].float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5)


def test_eval_loader_keeps_order_and_the_last_partial_batch():
    images = torch.zeros((10, 1, 2, 2), dtype=torch.uint8)
    loader = ResidentLoader(images, torch.arange(10), batch_size=4, mean=(0.0,), std=(1.0,), train=False,
                            flip=True, channels_last=True)
    batches = list(loader.epoch(0))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))
    assert batches[0][0].is_contiguous(memory_format=torch.channels_last)


def test_cutout_batch_matches_a_per_image_reference():
    from speedrun.data.loader import cutout_batch

    x = torch.randn(40, 2, 9, 7)
    gen = torch.Generator().manual_seed(5)
    out = cutout_batch(x, 4, gen)
    replay = torch.Generator().manual_seed(5)
    cy, cx = torch.randint(0, 9, (40,), generator=replay), torch.randint(0, 7, (40,), generator=replay)
    for i in range(40):
        expected = x[i].clone()
        top, left = int(cy[i]) - 2, int(cx[i]) - 2
        expected[:, max(top, 0):max(top + 4, 0), max(left, 0):max(left + 4, 0)] = 0.0
        assert torch.equal(out[i], expected), i
    assert cutout_batch(x, 0) is x


def test_alternating_flip_shows_each_image_both_ways_every_two_epochs():
    n = 64
    images = torch.arange(n * 4, dtype=torch.uint8).view(n, 1, 1, 4)  # asymmetric rows: flips are visible
    loader = ResidentLoader(images, torch.arange(n), batch_size=16, mean=(0.0,), std=(1 / 255,), train=True,
                            seed=3, flip=True, alternating_flip=True)

    def flipped(epoch):
        state = {}
        for x, y in loader.epoch(epoch):
            for row, label in zip(x, y):
                state[int(label)] = bool(row[0, 0, 0] > row[0, 0, -1])  # descending row = mirrored
        return state

    e0, e1, e2 = flipped(0), flipped(1), flipped(2)
    assert all(e0[i] != e1[i] for i in range(n)) and e0 == e2
    assert 10 < sum(e0.values()) < 54  # the first epoch's choice is random


def test_sample_is_a_seeded_unaugmented_draw_of_distinct_images():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 4, 4).contiguous()
    kw = dict(batch_size=4, mean=(0.5,), std=(0.25,), train=True, flip=True, translate_px=1, cutout_px=2)
    loader = ResidentLoader(images, torch.zeros(20, dtype=torch.long), seed=1, **kw)
    sample = loader.sample(8)
    pixels = sample * 0.25 * 255 + 0.5 * 255  # undo the normalization: every pixel is the image's index
    assert torch.allclose(pixels, pixels.round(), atol=1e-4)
    assert torch.equal(pixels.round(), pixels[:, :, :1, :1].round().expand(8, 1, 4, 4))  # no cutout
    assert len(set(pixels[:, 0, 0, 0].round().tolist())) == 8 and torch.equal(loader.sample(8), sample)
    assert len(loader.sample(100)) == 20
    other = ResidentLoader(images, torch.zeros(20, dtype=torch.long), seed=2, **kw).sample(8)
    assert not torch.equal(other, sample)
