"""ImageFolder trees and archives: layout checks, decoding (modes, sizes, bad files), fingerprints,
the cache, the data command, and a slice of the real CIFAR-10 JPEG archive."""
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from speedrun.data import download, imagefolder
from speedrun.data.cifar import CifarSource
from speedrun.data.cli import main as data_main
from speedrun.data.imagefolder import ImageFolderSource, cache_layout, holdout_split, scan
from speedrun.data.sources import DataError, IdxSource, load_prepared, prepare, read_meta, resolve
from tests.conftest import (CIFAR10_NAMES, TINY, make_tar, synthetic_images, write_cifar10, write_idx_dataset,
                            write_image, write_tree)

PETS = {"train": {"dog": 3, "cat": 4}, "test": {"cat": 2, "dog": 1}}


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def chw(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1)


def warnings_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("warning:")]


def test_tree_is_prepared_with_sorted_classes_and_exact_pixels(tmp_path):
    root = write_tree(tmp_path / "pets", PETS)
    source = resolve(str(root))
    assert isinstance(source, ImageFolderSource) and source.name == "pets"
    prepared = prepare(source)
    data = load_prepared(prepared.directory)
    assert data.classes == ("cat", "dog") and data.channels == 3 and data.image_size == (16, 16)
    assert data.train_labels.tolist() == [0] * 4 + [1] * 3 and data.test_labels.tolist() == [0, 0, 1]
    assert np.array_equal(data.train_images[4], chw(root / "train/dog/000.png"))  # PNG: lossless
    assert np.array_equal(data.test_images[2], chw(root / "test/dog/000.png"))
    pixels = data.train_images.astype(np.float64) / 255
    assert data.mean == pytest.approx(tuple(pixels.mean(axis=(0, 2, 3))))
    assert data.std == pytest.approx(tuple(pixels.std(axis=(0, 2, 3))))
    meta = read_meta(prepared.directory)
    assert meta["source"] == str(root.resolve()) and meta["counts"] == {"train": [4, 3], "test": [2, 1]}
    assert meta["details"]["test_from"] == "test/" and meta["details"]["skipped"] == 0
    assert not prepare(resolve(str(root))).built  # unchanged: reused


def test_val_is_the_test_split_when_both_exist(tmp_path):
    root = write_tree(tmp_path / "t", {"train": {"a": 2, "b": 2}, "val": {"a": 1}, "test": {"b": 3}})
    listing = scan(root)
    assert listing.test_from == "val/" and [label for _, label in listing.test] == [0]


def test_grayscale_rgba_palette_and_16_bit_become_rgb(tmp_path, capsys):
    root = tmp_path / "modes"
    write_image(root / "train/a/gray.png", np.full((8, 8), 77))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    write_image(root / "train/a/rgba.png", rgba, "RGBA")
    palette = Image.new("P", (8, 8))
    palette.putpalette([200, 100, 50] + [0] * 765)
    palette.save(root / "train/a/palette.png")
    (root / "train/b").mkdir()
    Image.fromarray(np.full((8, 8), 0x4A00, np.uint16)).save(root / "train/b/sixteen.png")  # 16-bit grey
    write_image(root / "test/a/color.jpg", np.full((8, 8, 3), (0, 128, 255)), quality=95)
    data = ImageFolderSource(root).read()
    images = dict(zip(["gray", "palette", "rgba", "sixteen"], data.train_images))
    assert data.channels == 3 and data.train_images.shape == (4, 3, 8, 8)
    assert (images["gray"] == 77).all() and (images["sixteen"] == 0x4A).all()
    assert images["rgba"][:, 0, 0].tolist() == [10, 20, 30] and images["palette"][:, 0, 0].tolist() == [200, 100, 50]
    assert np.abs(data.test_images[0][:, 4, 4].astype(int) - [0, 128, 255]).max() <= 3  # JPEG
    assert not warnings_in(capsys.readouterr().err)


def test_an_all_grayscale_tree_keeps_one_channel(tmp_path):
    x, y = synthetic_images(12, classes=2, size=10)
    for i, (image, label) in enumerate(zip(x, y)):
        write_image(tmp_path / "g" / ("train" if i < 8 else "test") / f"c{label}" / f"{i}.png", image)
    data = ImageFolderSource(tmp_path / "g").read()
    assert data.channels == 1 and data.train_images.shape == (8, 1, 10, 10)
    assert np.array_equal(data.train_images[:, 0], np.stack([x[i] for i in np.argsort(y[:8], kind="stable")]))


def add_bad_files(root):
    good = (root / "train/cat/000.png").read_bytes()
    (root / "train/cat/001.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "train/dog/notes.txt").write_text("not an image")
    (root / "test/cat/empty.png").write_bytes(b"")
    (root / "train/dog/link.png").symlink_to(root / "nowhere.png")  # unreadable: a broken link


def test_bad_files_are_skipped_counted_and_the_first_named(tmp_path, capsys):
    root = write_tree(tmp_path / "pets", PETS)
    add_bad_files(root)
    prepared = prepare(resolve(str(root)))
    lines = warnings_in(capsys.readouterr().err)
    assert lines == ["warning: skipped 4 of 13 files that cannot be decoded: train/cat/001.png (truncated), "
                     "train/dog/link.png (missing or a broken link), train/dog/notes.txt (not an image), ..."]
    data = load_prepared(prepared.directory)
    assert data.train_labels.tolist() == [0] * 3 + [1] * 3 and data.test_labels.tolist() == [0, 0, 1]
    assert np.array_equal(data.train_images[1], chw(root / "train/cat/002.png"))  # later images move up
    details = read_meta(prepared.directory)["details"]
    assert details["skipped"] == 4 and details["skipped_files"][-1] == "test/cat/empty.png"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_a_file_without_read_permission_is_skipped(tmp_path, capsys):
    root = write_tree(tmp_path / "pets", PETS)
    (root / "train/cat/002.png").chmod(0)
    ImageFolderSource(root).read()
    assert "train/cat/002.png (permission denied)" in warnings_in(capsys.readouterr().err)[0]


def test_strict_makes_a_bad_file_an_error_and_leaves_no_cache(tmp_path, isolated_home):
    root = write_tree(tmp_path / "pets", PETS)
    add_bad_files(root)
    with pytest.raises(DataError) as e:
        prepare(resolve(str(root), strict=True))
    assert one_line(e) == (f"{root}: 4 of 13 files cannot be decoded: train/cat/001.png (truncated), "
                           "train/dog/link.png (missing or a broken link), train/dog/notes.txt (not an image), "
                           "... (remove them, or prepare without --strict to skip them)")
    assert not any((isolated_home / "cache").iterdir())


def test_empty_class_folders_are_named(tmp_path):
    root = write_tree(tmp_path / "t", {"train": {"cat": 2, "dog": 0, "bird": 0}, "test": {"cat": 1}})
    with pytest.raises(DataError) as e:
        prepare(resolve(str(root)))
    assert one_line(e) == (f"{root / 'train'}: empty class folders bird, dog "
                           "(every class folder needs at least one image)")
    root = write_tree(tmp_path / "u", {"train": {"cat": 2}, "test": {"cat": 0}})
    with pytest.raises(DataError, match=r"test: empty class folder cat \(every"):
        prepare(resolve(str(root)))


def test_test_classes_missing_from_train_are_named(tmp_path):
    root = write_tree(tmp_path / "t", {"train": {"cat": 2}, "test": {"cat": 1, "owl": 1, "fox": 1}})
    with pytest.raises(DataError) as e:
        prepare(resolve(str(root)))
    assert one_line(e) == (f"{root / 'test'}: class folders fox, owl not in {root / 'train'} "
                           "(test classes must be training classes)")


def test_a_class_whose_every_file_is_bad_is_an_error(tmp_path):
    root = write_tree(tmp_path / "t", {"train": {"cat": 2}, "test": {"cat": 1}})
    (root / "train/owl").mkdir()
    (root / "train/owl/a.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"train: no decodable image in class folder owl$"):
        prepare(resolve(str(root)))


def halves(width, height) -> np.ndarray:
    """Left half red, right half blue."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 2, 0] = 255
    image[:, width // 2:, 2] = 255
    return image


def test_mixed_sizes_are_resized_to_the_common_size_with_one_warning(tmp_path, capsys):
    root = write_tree(tmp_path / "m", {"train": {"a": 3}, "test": {"a": 2}})
    write_image(root / "train/a/wide.png", halves(24, 20))
    data = ImageFolderSource(root).read()
    assert data.train_images.shape == (4, 3, 16, 16)
    assert warnings_in(capsys.readouterr().err) == [
        "warning: images come in 2 sizes (16x16 (5), 24x20 (1)); all resized to 16x16 (shorter side, then centre crop)"]
    wide = data.train_images[3]  # 24x20 -> centre 20x20 (x 2..22) -> 16x16: red columns 0-7, blue 8-15
    assert (wide[0, :, :7] > 240).all() and (wide[2, :, :7] < 15).all()
    assert (wide[2, :, 9:] > 240).all() and (wide[0, :, 9:] < 15).all()


def test_a_wrong_guess_from_the_header_sample_decodes_again(tmp_path, monkeypatch, capsys):
    root = write_tree(tmp_path / "m", {"train": {"a": 3, "b": 2}, "test": {"a": 2}})
    expected = ImageFolderSource(root).read()
    monkeypatch.setattr(imagefolder, "probe", lambda files: (Counter({(9, 9): 1}), True))  # "all 9x9 grey"
    again = ImageFolderSource(root).read()
    assert "decoding again as 3x16x16" in capsys.readouterr().err
    assert np.array_equal(again.train_images, expected.train_images) and again.mean == expected.mean


def test_large_images_get_the_shorter_side_max_size_and_a_centre_crop(tmp_path):
    root = tmp_path / "big"
    thirds = np.zeros((64, 96, 3), np.uint8)  # 96 wide, 64 high: red | green | blue
    thirds[:, :32, 0] = thirds[:, 32:64, 1] = thirds[:, 64:, 2] = 255
    for split in ("train", "test"):
        write_image(root / split / "a" / "x.png", thirds)
        write_image(root / split / "a" / "y.jpg", np.repeat(np.repeat(thirds, 4, 0), 4, 1), quality=95)  # 384x256
    data = ImageFolderSource(root, max_size=32).read()
    assert data.train_images.shape == (2, 3, 32, 32)
    for image in data.train_images:  # centre 64x64 of 96x64 = x 16..80: red cols 0-7, green 8-23, blue 24-31
        assert (image[0, :, :6] > 230).all() and (image[1, :, 10:22] > 230).all() and (image[2, :, 26:] > 230).all()
        assert (image[1, :, :6] < 25).all() and (image[0, :, 10:22] < 25).all()


def test_one_small_size_is_kept_even_when_not_square(tmp_path):
    root = tmp_path / "r"
    for split in ("train", "test"):
        write_image(root / split / "a" / "x.png", halves(20, 12))
    assert ImageFolderSource(root).read().train_images.shape == (1, 3, 12, 20)


def test_cache_layout_rules():
    assert cache_layout(Counter({(32, 32): 5}), False, 64) == (3, 32, 32)
    assert cache_layout(Counter({(32, 32): 5}), True, 16) == (1, 16, 16)
    assert cache_layout(Counter({(500, 375): 2}), False, 64) == (3, 64, 64)
    assert cache_layout(Counter({(28, 28): 2, (32, 30): 5}), False, 64) == (3, 30, 30)  # most common shorter side
    assert cache_layout(Counter({(28, 28): 2, (500, 400): 5}), False, 64) == (3, 64, 64)


def test_holdout_split_is_deterministic_and_keeps_every_class(tmp_path):
    files = [f"/d/c/{i:03d}.jpg" for i in range(30)]
    train, held = holdout_split(files, 0.1)
    assert len(held) == 3 and sorted(train + held) == files and train == sorted(train)
    assert holdout_split(files[::-1], 0.1)[1] == held[::-1]  # depends on names, not order
    assert holdout_split(["a.png"], 0.5) == (["a.png"], []) and len(holdout_split(["a", "b"], 0.01)[1]) == 1
    root = write_tree(tmp_path / "h", {"train": {"a": 10, "b": 20}})
    listing = scan(root, holdout_frac=0.2)
    assert listing.test_from == "20% of train/"
    assert Counter(label for _, label in listing.test) == {0: 2, 1: 4}
    assert not {f for f, _ in listing.train} & {f for f, _ in listing.test}
    assert scan(root, holdout_frac=0.2) == listing
    data = load_prepared(prepare(resolve(str(root), holdout_frac=0.2)).directory)
    assert len(data.train_labels) == 24 and len(data.test_labels) == 6


def test_fingerprint_follows_files_and_prepare_options(tmp_path):
    root = write_tree(tmp_path / "f", PETS)
    base = ImageFolderSource(root)
    fp = base.fingerprint()
    assert ImageFolderSource(root, strict=True, workers=1).fingerprint() == fp  # no effect on the cache
    assert ImageFolderSource(root, max_size=8).fingerprint() != fp
    assert ImageFolderSource(root, holdout_frac=0.2).fingerprint() != fp
    first = prepare(base)
    assert not prepare(ImageFolderSource(root)).built
    os.utime(root / "test/cat/000.png", ns=(1, 1))
    assert base.fingerprint() != fp
    assert prepare(base).built
    smaller = prepare(ImageFolderSource(root, max_size=8))
    assert smaller.built and smaller.directory != first.directory
    assert load_prepared(smaller.directory).train_images.shape == (7, 3, 8, 8)


def test_archive_is_extracted_once_into_the_cache_and_matches_the_folder(tmp_path, isolated_home, monkeypatch):
    root = write_tree(tmp_path / "pets", PETS)
    archive = make_tar(root, tmp_path / "pets.tar.gz")  # the tree wrapped in a pets/ folder
    extractions = []
    real = download.extract_files
    monkeypatch.setattr(download, "extract_files", lambda *a: (extractions.append(a), real(*a))[1])
    source = resolve(str(archive))
    assert isinstance(source, ImageFolderSource) and source.name == "pets" and source.is_archive
    from_archive = load_prepared(prepare(source).directory)
    from_folder = load_prepared(prepare(resolve(str(root))).directory)
    assert np.array_equal(from_archive.train_images, from_folder.train_images)
    assert from_archive.classes == from_folder.classes
    assert prepare(resolve(str(archive), max_size=8)).built  # new options: prepared again, not extracted again
    assert len(extractions) == 1
    extracted = list((isolated_home / "cache" / "extracted").iterdir())
    assert [p.name for p in extracted] == [f"pets-{source._archive_key()}"]  # no temporary folder left


def test_archive_members_escaping_the_folder_are_refused(tmp_path):
    root = write_tree(tmp_path / "pets", PETS)
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="pets")
        tf.add(root / "train/cat/000.png", arcname="../escaped.png")
    with pytest.raises(DataError) as e:
        prepare(resolve(str(archive)))
    assert one_line(e) == (f"{archive}: member '../escaped.png' points outside the archive's folder; "
                           "refusing to extract it")
    assert not (tmp_path / "escaped.png").exists()


def test_unrecognised_and_unreadable_archives(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="unrecognised dataset layout") as e:
        resolve(str(make_tar(tmp_path / "notes", tmp_path / "notes.tar.gz")))
    one_line(e)
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="broken.tar.gz: not a readable tar archive") as e:
        resolve(str(tmp_path / "broken.tar.gz"))
    one_line(e)


def test_resolve_detects_each_layout(tmp_path):
    x, y = synthetic_images(8)
    assert isinstance(resolve(str(write_idx_dataset(tmp_path / "idx", x, y, x, y))), IdxSource)
    assert isinstance(resolve(str(write_cifar10(tmp_path / "c"))), CifarSource)
    write_tree(tmp_path / "wrapper" / "pets", PETS)  # a folder whose only sub-folder is the tree
    source = resolve(str(tmp_path / "wrapper"))
    assert isinstance(source, ImageFolderSource) and source.root() == tmp_path / "wrapper" / "pets"


def test_interrupted_decode_leaves_no_cache_and_a_rerun_works(tmp_path, monkeypatch, isolated_home):
    root = write_tree(tmp_path / "pets", PETS)
    real, calls = imagefolder.decode_image, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(imagefolder, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(resolve(str(root), workers=1))
    assert [p.name for p in (isolated_home / "cache").iterdir()] == []
    monkeypatch.setattr(imagefolder, "decode_image", real)
    assert prepare(resolve(str(root), workers=1)).built


def test_parallel_decode_gives_the_serial_result(tmp_path, capsys):
    root = write_tree(tmp_path / "pets", {"train": {"a": 9, "b": 8}, "test": {"a": 3, "b": 4}})
    add_bad_files(write_tree(root, {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1}}, seed=1))
    serial = ImageFolderSource(root, workers=1).read()
    parallel = ImageFolderSource(root, workers=2, chunk=3).read()
    assert "with 2 threads" in capsys.readouterr().err
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        assert np.array_equal(getattr(serial, key), getattr(parallel, key)), key
    assert serial.mean == parallel.mean


def test_a_script_without_a_main_guard_can_prepare_an_image_folder(tmp_path, isolated_home):
    """Decoding with several workers starts no processes, so nothing re-runs the caller's script (with
    process workers, an unguarded script was re-imported by each one and the pool respawned them forever)."""
    root = write_tree(tmp_path / "pets", {"train": {"a": 6, "b": 6}, "test": {"a": 2, "b": 2}})
    script = tmp_path / "unguarded.py"
    script.write_text("import speedrun.data as d\n"
                      f"p = d.prepare(d.resolve({str(root)!r}, workers=2))\n"
                      "print('prepared', p.built)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SPEEDRUN_HOME": str(isolated_home)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["prepared True"]
    assert "with 2 threads" in done.stderr


# ---- a slice of the real CIFAR-10 JPEG archive

def test_info_reads_a_cache_prepared_before_meta_version_2(tmp_path, capsys):
    prepared = prepare(resolve(str(write_tree(tmp_path / "pets", PETS))))
    meta = read_meta(prepared.directory)
    old = {k: meta[k] for k in ("name", "classes", "mean", "std", "train", "test", "shape", "fingerprint", "prepare_s")}
    (prepared.directory / "meta.json").write_text(json.dumps(old))
    assert load_prepared(prepared.directory).classes == ("cat", "dog")
    assert data_main(["data", "info", str(tmp_path / "pets")]) == 0
    text = capsys.readouterr().out
    assert "train        7 images\n" in text and "source       -" in text and "3x16x16" in text


def test_real_cifar10_jpeg_slice_is_decoded_as_pillow_does(cifar_jpeg_slice):
    data = load_prepared(prepare(resolve(str(cifar_jpeg_slice))).directory)
    assert data.classes == CIFAR10_NAMES and data.train_images.shape == (200, 3, 32, 32)
    assert np.bincount(data.test_labels).tolist() == [20] * 10
    first = sorted((cifar_jpeg_slice / "train" / "airplane").iterdir())[0]
    assert np.array_equal(data.train_images[0], chw(first))
    assert all(0.35 < m < 0.6 for m in data.mean) and all(0.18 < s < 0.32 for s in data.std)


def test_real_slice_through_the_data_command(cifar_jpeg_slice, tmp_path, capsys):
    archive = make_tar(cifar_jpeg_slice, tmp_path / "cifar10-jpeg-slice.tar.gz", arcname="")
    assert data_main(["data", "prepare", str(archive), "--json"]) == 0
    prepared = json.loads(capsys.readouterr().out)
    assert prepared["built"] and prepared["name"] == "cifar10-jpeg-slice" and prepared["shape"] == [3, 32, 32]
    assert prepared["counts"]["train"] == [20] * 10 and prepared["source"] == str(archive)
    assert data_main(["data", "info", str(archive), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fingerprint"] == prepared["fingerprint"] and info["size_bytes"] > 400 * 3 * 32 * 32
    assert data_main(["data", "prepare", str(archive)]) == 0
    text = capsys.readouterr().out
    assert "already prepared and unchanged" in text and "3x32x32 (channels x height x width)" in text
    assert "20 per class" in text and "from test/" in text
    assert data_main(["data", "info", info["cache"]]) == 0 and "airplane, automobile" in capsys.readouterr().out
    assert data_main(["data", "info", str(archive), "--max-size", "16"]) == 2
    error = capsys.readouterr().err.strip()
    assert "is not prepared (no cache at" in error and "run `speedrun data prepare" in error and "\n" not in error


def test_real_slice_archive_trains_end_to_end(cifar_jpeg_slice, tmp_path, monkeypatch):
    from speedrun.measure import flops
    from speedrun.train.run import train

    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: 1e11)  # seconds of matmuls, not data's concern
    archive = make_tar(cifar_jpeg_slice, tmp_path / "slice.tar.gz", arcname="")
    result = train("fashion-mnist", data=archive, target=0.99, store=None,
                   overrides={**TINY, "train.epochs": "1", "train.batch_size": "64"})
    assert result.outcome == "budget_exhausted", result.detail  # 3-channel 32x32 images, 10 classes: it ran
