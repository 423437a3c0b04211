"""The aspect-preserving cache and files decoded on access: round trips, hostile images (very large, CMYK,
greyscale, EXIF-rotated, progressive, 16-bit, smaller than the crop), and training end to end on both,
including a slice of the real Imagewoof archive."""
from __future__ import annotations

import json
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from speedrun.data import imagefolder
from speedrun.data.imagefolder import Aspect, FileImages, ImageFolderSource, aspect_size, decode_image
from speedrun.data.imageset import RaggedImages
from speedrun.data.sources import DataError, load_prepared, prepare, read_meta, resolve
from tests.conftest import write_image

IMAGEWOOF = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagewoof2-160.tar.gz"


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning:")]


def _tree(root: Path, sizes: dict[str, list[tuple[int, int]]], seed: int = 0) -> Path:
    """PNGs of random pixels: ``{"train/a": [(w, h), ...], ...}``."""
    rng = np.random.default_rng(seed)
    for folder, whs in sizes.items():
        for i, (w, h) in enumerate(whs):
            write_image(root / folder / f"{i:02d}.png", rng.integers(0, 256, (h, w, 3)))
    return root


def _expected(path: Path, max_size: int) -> np.ndarray:
    """What the aspect layout should store: the upright image, shorter side capped, Pillow's bicubic."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        size = aspect_size(*img.size, max_size)
        if size != img.size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(img).transpose(2, 0, 1)


SIZES = {"train/a": [(40, 24), (24, 40), (20, 20)], "train/b": [(12, 9), (64, 16)],
         "test/a": [(30, 22)], "test/b": [(17, 50)]}


def test_aspect_layout_keeps_each_images_aspect_with_the_shorter_side_capped(tmp_path):
    root = _tree(tmp_path / "t", SIZES)
    prepared = prepare(resolve(str(root), layout="aspect", max_size=16))
    data = load_prepared(prepared.directory)
    assert data.layout == "aspect" and isinstance(data.train_images, RaggedImages)
    files = sorted((root / "train").glob("*/*.png"))
    stored = [data.train_images[i] for i in range(len(files))]
    assert [im.shape[1:] for im in stored] == [(16, 27), (27, 16), (16, 16), (9, 12), (16, 64)]  # 12x9 kept
    for image, path in zip(stored, files):
        assert np.array_equal(image, _expected(path, 16)), path
    pixels = np.concatenate([im.reshape(3, -1) for im in stored], 1).astype(np.float64) / 255
    assert data.mean == pytest.approx(tuple(pixels.mean(1))) and data.std == pytest.approx(tuple(pixels.std(1)))
    assert data.image_size == (16, 16) and data.channels == 3  # cropped to the most common shorter side
    mapped = load_prepared(prepared.directory, mmap=True)
    assert isinstance(mapped.train_images.data, np.memmap)
    assert all(np.array_equal(mapped.test_images[i], data.test_images[i]) for i in range(2))
    meta = read_meta(prepared.directory)
    assert meta["layout"] == "aspect" and meta["shape"] == [3, 16, 16]
    assert meta["details"]["max_aspect"] == pytest.approx(4.0) and meta["details"]["resized"] == 5
    assert not prepare(resolve(str(root), layout="aspect", max_size=16)).built
    assert prepare(resolve(str(root), max_size=16)).directory != prepared.directory  # square: another cache


def test_files_layout_lists_the_files_and_decodes_them_as_the_aspect_cache_stores_them(tmp_path):
    root = _tree(tmp_path / "t", SIZES)
    aspect = load_prepared(prepare(resolve(str(root), layout="aspect", max_size=16)).directory)
    prepared = prepare(resolve(str(root), layout="files", max_size=16))
    files = load_prepared(prepared.directory)
    assert files.layout == "files" and isinstance(files.train_images, FileImages) and files.nbytes == 0
    assert files.train_labels.tolist() == aspect.train_labels.tolist() and files.image_size == (16, 16)
    for i, image in enumerate(files.train_images.read(range(5))):
        assert np.array_equal(image, aspect.train_images[i])
    assert files.mean == pytest.approx(aspect.mean)  # every training image is in the statistics' sample
    assert read_meta(prepared.directory)["files_root"] == str(root)


def _jpeg(path: Path, array: np.ndarray, mode: str | None = None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **save)
    return path


def _png16(path: Path, rgb: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def halves(width: int, height: int) -> np.ndarray:
    """Left half red, right half blue."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2, 0] = 255
    image[:, width // 2:, 2] = 255
    return image


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees clockwise
    path = _jpeg(tmp_path / "rotated.jpg", halves(40, 20), exif=exif.tobytes(), quality=95)
    image, size, _ = decode_image(str(path), Aspect(3, 64))
    assert size == (20, 40) and image.shape == (3, 40, 20)  # upright: 20 wide, 40 high
    assert (image[0, :18] > 200).all() and (image[2, 22:] > 200).all()  # red on top, blue below
    square, _, _ = decode_image(str(path), (3, 16, 16))
    assert (square[0, :6] > 200).all() and (square[2, 10:] > 200).all()  # the square cache too


def test_cmyk_greyscale_progressive_and_16_bit_images_decode_as_pillow_shows_them(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 64x48
    cmyk = _jpeg(tmp_path / "cmyk.jpg", np.kron(rng.integers(0, 256, (6, 8, 4)), np.ones((8, 8, 1))).astype(np.uint8),
                 "CMYK", quality=95)
    grey = _jpeg(tmp_path / "grey.jpg", smooth[..., 0], "L", quality=95)
    progressive = _jpeg(tmp_path / "progressive.jpg", smooth, progressive=True, quality=95)
    sixteen = _png16(tmp_path / "sixteen.png", smooth.astype(np.uint16) * 256 + 100)  # low bytes must not matter
    with Image.open(progressive) as img:
        assert img.info.get("progressive")
    for path in (cmyk, grey, progressive):
        image, size, _ = decode_image(str(path), Aspect(3, 64))
        assert size == (64, 48) and np.array_equal(image, _expected(path, 64)), path.name
    image, _, _ = decode_image(str(sixteen), Aspect(3, 64))
    assert np.array_equal(image, smooth.transpose(2, 0, 1))  # the high byte of each 16-bit sample
    shrunk, _, _ = decode_image(str(progressive), Aspect(3, 24))  # libjpeg's 1/2 scale on a progressive file
    with Image.open(progressive) as img:
        img.draft("RGB", (32, 24))
        assert img.size == (32, 24)
        assert np.array_equal(shrunk, np.asarray(img.convert("RGB")).transpose(2, 0, 1))


def test_a_very_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    big = np.zeros((6000, 8000, 3), np.uint8)
    big[:, 4000:] = (0, 0, 255)
    path = _jpeg(tmp_path / "big.jpg", big, quality=75)
    image, size, _ = decode_image(str(path), Aspect(3, 160))
    assert size == (8000, 6000) and image.shape == (3, 160, 213)
    assert (image[2, :, :100] < 10).all() and (image[2, :, 115:] > 245).all()


def test_too_large_and_bad_images_are_skipped_and_named(tmp_path, monkeypatch, capsys):
    root = _tree(tmp_path / "t", {"train/a": [(20, 20)] * 2, "train/b": [(20, 20)] * 2, "test/a": [(20, 20)]})
    write_image(root / "train/a/huge.png", np.zeros((60, 50, 3)))
    (root / "train/b/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3,000 pixels and more: refused as a bomb
    data = load_prepared(prepare(resolve(str(root), layout="aspect", max_size=16)).directory)
    assert len(data.train_labels) == 4
    [line] = warnings_in(capsys.readouterr().err)
    assert line.startswith("warning: skipped 2 of 7 files that cannot be decoded: train/a/huge.png (too large: "
                           "over 2,000 pixels (Pillow's limit against decompression bombs)), train/b/broken.jpg (")


def test_images_smaller_than_the_crop_train_and_evaluate(tmp_path, capsys):
    import speedrun

    root = _tree(tmp_path / "small", {"train/a": [(9, 7)] * 6 + [(40, 30)] * 2, "train/b": [(5, 11)] * 8,
                                      "test/a": [(6, 6)] * 2, "test/b": [(7, 3)] * 2})
    result = speedrun.train("imagewoof", data=root, store=None, stop_at_target=False, budget="1ep", overrides={
        "data.max_size": 16, "data.crop_size": 24, "eval.crop_size": 32, "model.widths": "8,8,8,8",
        "train.batch_size": 8, "eval.batch_size": 4, "data.resize_start_scale": 0.5,
        # fp32: this is a test of the data path. In bf16 (auto on a native-bf16 CPU) this 8-channel net on
        # 12-24 px crops of 5-40 px images diverged at step 1 in about half the fresh processes on a Xeon
        # with AMX (fp32 never), a recorded "diverged" outcome, not a crash.
        "train.precision": "fp32"})
    assert result.outcome == "budget_exhausted", result.detail
    assert result.classifier.image_size == (32, 32)  # what evaluations fed the model: the test resolution
    assert result.predict(np.zeros((2, 3, 32, 32), np.uint8)).shape == (2, 2)
    from speedrun.cli import main

    result.save(tmp_path / "model.pt")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "model.pt"), "--data", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == result.curve[-1].accuracy  # the same crops
    # predict decodes the files as the aspect cache did and crops them as the evaluation did
    assert main(["predict", str(tmp_path / "model.pt"), str(root / "test"), "--top-k", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["predictions"]
    from speedrun.data import CropLoader, load_prepared, prepare, resolve

    images = load_prepared(prepare(resolve(str(root), layout="aspect", max_size=16)).directory, mmap=True)
    loader = CropLoader(images.test_images.to("cpu"), np.array(images.test_labels), size=32, train=False,
                        batch_size=4, crop_frac=result.recipe.eval.crop_frac, mean=(0.0,) * 3, std=(1 / 255,) * 3)
    (x, _), = loader.epoch(0)
    expected = result.classifier.predict(x / 255)
    assert [p["file"].rsplit("test/", 1)[1] for p in got] == ["a/00.png", "a/01.png", "b/00.png", "b/01.png"]
    for row, probs in zip(got, expected):
        assert row["top"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-4)


# Tiny nets here start at 8 channels, not 4: torch 2.13.0's oneDNN 1x1 stride-2 convolution in channels_last
# never returns from its weight gradient with 4 input channels on AVX2 CPUs (a plain nn.Conv2d(4, 16, 1,
# stride=2) on a 4x4x24x24 input hangs; 8 or more channels do not).
def test_a_file_that_breaks_after_preparing_is_skipped_and_named_while_training(tmp_path, capsys):
    import speedrun

    root = _tree(tmp_path / "t", {"train/a": [(20, 24)] * 6, "train/b": [(24, 20)] * 6, "test/a": [(20, 20)] * 2,
                                  "test/b": [(20, 20)] * 2})
    overrides = {"data.max_size": 16, "data.loader": "decode", "model.widths": "8,8,8,8", "train.batch_size": 4,
                 "eval.batch_size": 4, "data.decode_workers": 2}
    speedrun.train("imagewoof", data=root, store=None, stop_at_target=False, budget="1ep", overrides=overrides)
    path = root / "train/b/02.png"
    good, stat = path.read_bytes(), path.stat()
    path.write_bytes(good[:60] + bytes(len(good) - 60))  # damaged pixels, same header, size and time: the
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # cache (its fingerprint) still lists it
    capsys.readouterr()
    result = speedrun.train("imagewoof", data=root, store=None, stop_at_target=False, budget="1ep",
                            overrides=overrides)
    assert result.outcome == "budget_exhausted", result.detail
    err = capsys.readouterr().err
    assert result.env["loader"] == "decode" and 11 <= result.images_seen <= 16, (result.images_seen, err)  # a short batch: the epoch budget counts images
    lines = warnings_in(err)
    assert len(lines) == 1, err
    [line] = lines
    assert line.startswith("warning: skipped train/b/02.png (") and line.endswith("): it cannot be decoded")


def test_layout_needs_an_image_folder_and_crop_options_need_the_aspect_layout(tmp_path, synthetic_dir):
    import speedrun
    from speedrun.config import ConfigError

    with pytest.raises(DataError, match="--layout aspect only apply to image-folder datasets"):
        resolve(str(synthetic_dir), layout="aspect")
    with pytest.raises(ConfigError, match="need data.layout=aspect"):
        speedrun.train("fashion-mnist", data=synthetic_dir, store=None, overrides={"eval.crop_size": 32})


@pytest.fixture(scope="session")
def imagewoof_slice(tmp_path_factory) -> Path:
    """The first 12 training and 6 validation images of each of the real Imagewoof archive's 10 classes."""
    if not IMAGEWOOF.is_file():
        pytest.skip(f"the real Imagewoof archive is absent ({IMAGEWOOF}; only the project's shared data has it)")
    root = tmp_path_factory.mktemp("imagewoof-slice")
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(IMAGEWOOF, "r|gz") as tf:
        for member in tf:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 4:
                continue
            key = parts[1:3]
            if taken.get(key, 0) < (12 if key[0] == "train" else 6):
                taken[key] = taken.get(key, 0) + 1
                tf.extract(member, root, filter="data")
            if len(taken) == 20 and all(v == (12 if k[0] == "train" else 6) for k, v in taken.items()):
                break
    return root / "imagewoof2-160"


def test_real_imagewoof_slice_prepares_and_trains_end_to_end(imagewoof_slice):
    import speedrun

    prepared = prepare(resolve(str(imagewoof_slice), layout="aspect", max_size=160))
    data = load_prepared(prepared.directory)
    assert len(data.train_labels) == 120 and len(data.test_labels) == 60 and data.image_size == (160, 160)
    assert all(min(data.train_images.sizes[i]) == 160 for i in range(120))  # the archive's shorter side is 160
    first = sorted((imagewoof_slice / "train" / data.classes[0]).iterdir())[0]
    assert np.array_equal(data.train_images[0], _expected(first, 160))
    for recipe in ("imagewoof", "imagenet-resnet50"):
        result = speedrun.train(recipe, data=imagewoof_slice, store=None, stop_at_target=False, budget="1ep",
                                overrides={"model.widths": "8,8,8,8", "train.batch_size": 16, "data.crop_size": 64,
                                           "eval.crop_size": 80, "eval.batch_size": 30})
        assert result.outcome == "budget_exhausted" and result.steps == 7, (recipe, result.detail)
        assert result.classifier.image_size == (80, 80) and result.curve[-1].accuracy >= 0


def test_streamed_and_resident_crops_are_the_same_batches(tmp_path):
    import torch

    from speedrun.recipes import get_recipe
    from speedrun.train.run import build_loaders

    root = _tree(tmp_path / "t", SIZES)
    directory = prepare(resolve(str(root), layout="aspect", max_size=16)).directory
    batches = {}
    for kind in ("resident", "stream"):
        recipe = get_recipe("imagewoof").override({"data.loader": kind, "data.max_size": 16, "train.batch_size": 2})
        loaders = build_loaders(recipe, directory, torch.device("cpu"), seed=1)
        assert loaders.kind == kind
        batches[kind] = [x for x, _ in loaders.train.epoch(3)] + [x for x, _ in loaders.test.epoch(0)]
    assert len(batches["stream"]) == 3 and all(torch.equal(a, b) for a, b in zip(*batches.values()))


def test_the_data_command_prepares_and_describes_each_layout(tmp_path, capsys):
    from speedrun.data.cli import main as data_main

    root = _tree(tmp_path / "t", SIZES)
    assert data_main(["data", "prepare", str(root), "--layout", "aspect", "--max-size", "16", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "aspect" and info["shape"] == [3, 16, 16] and info["train"] == 5
    assert data_main(["data", "info", str(root), "--layout", "files", "--max-size", "16"]) == 2  # not prepared
    assert data_main(["data", "prepare", str(root), "--layout", "files", "--max-size", "16"]) == 0
    text = capsys.readouterr().out
    assert "aspect kept, shorter side capped at 16 px (decoded as training reads the files; in the source: shorter " \
           "sides 9-24 px, aspect ratios up to 4.00)" in text and "(the list of files; the images stay" in text


def test_a_validation_split_holds_out_whole_images_of_the_aspect_cache(tmp_path):
    """data.val_frac on an aspect cache: the held-out images are evaluated, never trained on."""
    import torch

    from speedrun.recipes import get_recipe
    from speedrun.train.run import build_loaders

    root = _tree(tmp_path / "t", {"train/a": [(20, 24)] * 10, "train/b": [(24, 20)] * 10, "test/a": [(20, 20)] * 2,
                                  "test/b": [(20, 20)] * 2})
    directory = prepare(resolve(str(root), layout="aspect", max_size=16)).directory
    recipe = get_recipe("imagewoof").override({"data.max_size": 16, "data.val_frac": 0.2, "train.batch_size": 2,
                                                  "eval.split": "val"})
    loaders = build_loaders(recipe, directory, torch.device("cpu"), seed=1, read_test=False)
    assert loaders.test is None and len(loaders.holdout.val_rows) == 4
    assert len(loaders.train.labels) == 16 and len(loaders.val.labels) == 4
    images = loaders.images.train_images
    stored = [images[int(i)] for i in loaders.holdout.val_rows]
    held = [loaders.val.store[i] for i in range(4)]
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(stored, held))
    assert sorted(loaders.val.labels.tolist()) == [0, 0, 1, 1]  # stratified
