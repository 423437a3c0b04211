"""CIFAR-10/100 pickle batches: official folder and archive layouts, built-in names, downloads, bad files."""
import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import struct
import urllib.error

import numpy as np
import pytest

from speedrun import paths
from speedrun.data import cifar, download
from speedrun.data.cifar import CifarSource
from speedrun.data.sources import DataError, load_prepared, prepare, resolve
from tests.conftest import CIFAR10_NAMES, cifar_batch, make_tar, write_cifar10, write_cifar100, write_pickle


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_cifar10_folder_is_read_in_batch_order_as_nchw(tmp_path):
    folder = write_cifar10(tmp_path)
    source = resolve(str(folder))
    assert isinstance(source, CifarSource) and source.name == "cifar10"
    data = load_prepared(prepare(source).directory)
    batches = [pickle.loads((folder / f"data_batch_{i}").read_bytes()) for i in range(1, 6)]
    test = pickle.loads((folder / "test_batch").read_bytes())
    assert data.classes == CIFAR10_NAMES and data.channels == 3 and data.image_size == (32, 32)
    assert data.train_images.shape == (100, 3, 32, 32) and data.test_images.shape == (30, 3, 32, 32)
    assert data.train_labels.tolist() == [y for b in batches for y in b[b"labels"]]
    assert data.test_labels.tolist() == test[b"labels"]
    row = batches[1][b"data"][3]  # image 3 of batch 2: 1024 red, then green, then blue values, row-major
    image = data.train_images[20 + 3]
    assert np.array_equal(image[0].ravel(), row[:1024]) and np.array_equal(image[2].ravel(), row[2048:])
    assert image[1, 5, 7] == row[1024 + 5 * 32 + 7]
    pixels = data.train_images.astype(np.float64) / 255
    assert data.mean == pytest.approx(tuple(pixels.mean(axis=(0, 2, 3))))
    assert data.std == pytest.approx(tuple(pixels.std(axis=(0, 2, 3))))


def test_cifar100_takes_fine_labels_and_names(tmp_path):
    folder = write_cifar100(tmp_path)
    data = load_prepared(prepare(resolve(str(tmp_path))).directory)  # the folder holding cifar-100-python/
    train = pickle.loads((folder / "train").read_bytes())
    assert data.name == "cifar100" and data.num_classes == 100 and data.classes[7] == "fine7"
    assert data.train_labels.tolist() == train[b"fine_labels"] != train[b"coarse_labels"]
    assert data.train_images.shape == (60, 3, 32, 32) and data.test_images.shape == (20, 3, 32, 32)


def test_official_archive_is_read_without_extracting(tmp_path, isolated_home):
    folder = write_cifar10(tmp_path / "raw")
    archive = make_tar(folder, tmp_path / "cifar-10-python.tar.gz")
    source = resolve(str(archive))
    assert isinstance(source, CifarSource) and source.path == archive
    from_archive = load_prepared(prepare(source).directory)
    from_folder = load_prepared(prepare(resolve(str(folder))).directory)
    assert np.array_equal(from_archive.train_images, from_folder.train_images)
    assert np.array_equal(from_archive.test_labels, from_folder.test_labels)
    assert not (isolated_home / "cache" / "extracted").exists()
    assert not prepare(resolve(str(archive))).built  # unchanged archive: cache reused


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (SHORT_BINSTRING/BINSTRING), as the official files hold them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else
                   pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def test_python2_pickles_are_read(tmp_path):
    folder = write_cifar10(tmp_path)
    expected = CifarSource(folder, cifar.LAYOUTS["cifar10"]).read()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(pickle.loads((folder / name).read_bytes()))
        # Python 2's numpy named its module numpy.core; keys, names and pixels are py2 str.
        (folder / name).write_bytes(buf.getvalue().replace(b"numpy._core.", b"numpy.core."))
    assert b"U\x04data" in (folder / "test_batch").read_bytes()
    data = CifarSource(folder, cifar.LAYOUTS["cifar10"]).read()
    assert data.classes == CIFAR10_NAMES
    assert np.array_equal(data.train_images, expected.train_images)
    assert np.array_equal(data.test_labels, expected.test_labels)


def test_builtin_name_finds_the_datasets_folder_without_downloading(monkeypatch):
    write_cifar10(paths.datasets_dir())
    monkeypatch.setattr(download, "fetch", lambda url, dest: pytest.fail("must not download"))
    source = resolve("cifar10")
    assert source.path == paths.datasets_dir() / "cifar-10-batches-py"


def test_offline_builtin_says_where_it_looked_and_how_to_get_it(monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(download, "fetch", offline)
    with pytest.raises(DataError) as e:
        resolve("cifar100")
    message = one_line(e)
    assert f"CIFAR-100 not found at {paths.datasets_dir() / 'cifar-100-python'}" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message and "--data PATH" in message
    assert "could not download" in message
    with pytest.raises(DataError, match="CIFAR-10 not found") as e:
        resolve("cifar10", download=False)
    assert "could not download" not in one_line(e)
    assert not any(paths.datasets_dir().glob("*.part"))


def test_download_failing_its_checksum_is_deleted_and_reported(monkeypatch):
    monkeypatch.setattr(download, "fetch", lambda url, dest: dest.write_bytes(b"<html>captive portal</html>"))
    with pytest.raises(DataError) as e:
        resolve("cifar10")
    message = one_line(e)
    assert "cifar-10-python.tar.gz fails its checksum" in message
    assert "expected c58f30108f718f92721af3b95e74349a" in message
    assert "deleted" in message
    assert sorted(os.listdir(paths.datasets_dir())) == []  # neither the file nor its .part


def test_download_with_matching_checksum_is_used(tmp_path, monkeypatch):
    archive = make_tar(write_cifar10(tmp_path), tmp_path / "official.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(cifar.LAYOUTS, "cifar10", dataclasses.replace(cifar.LAYOUTS["cifar10"], md5=md5))
    fetched = []
    monkeypatch.setattr(download, "fetch", lambda url, dest: (fetched.append(url), shutil.copy(archive, dest)))
    source = resolve("cifar10")
    assert fetched == [cifar.LAYOUTS["cifar10"].url]
    assert source.path == paths.datasets_dir() / "cifar-10-python.tar.gz" and source.path.is_file()
    assert len(load_prepared(prepare(source).directory).train_labels) == 100
    assert resolve("cifar10").path == source.path and len(fetched) == 1  # found locally the second time


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "data_batch_3").write_bytes((f / "data_batch_3").read_bytes()[:500]),
     "data_batch_3: not a CIFAR pickle batch"),
    (lambda f: write_pickle(f / "test_batch", {b"data": np.zeros((4, 1000), np.uint8), b"labels": [0] * 4}),
     r"test_batch: malformed batch \(data uint8 \(4, 1000\), 4 labels"),
    (lambda f: write_pickle(f / "test_batch", {**cifar_batch(4, seed=0), b"labels": [0, 1, 2, 10]}),
     r"test_batch: labels outside 0..9"),
    (lambda f: write_pickle(f / "batches.meta", {b"names": []}), "batches.meta: no 'label_names'"),
    (lambda f: write_pickle(f / "data_batch_1", [1, 2, 3]), "data_batch_1: not a CIFAR pickle batch .holds a list"),
    (lambda f: (f / "data_batch_1").write_bytes(pickle.dumps(os.system)), r"refusing to load \w+\.system"),
])
def test_bad_batches_are_one_line_errors(tmp_path, isolated_home, damage, message):
    folder = write_cifar10(tmp_path)
    damage(folder)
    with pytest.raises(DataError, match=message) as e:
        prepare(resolve(str(folder)))
    one_line(e)
    assert not any((isolated_home / "cache").glob("*"))  # no cache, no half cache


def test_archive_missing_a_batch_names_it(tmp_path):
    folder = write_cifar10(tmp_path / "raw")
    (folder / "data_batch_4").unlink()
    archive = make_tar(folder, tmp_path / "partial.tar.gz")
    with pytest.raises(DataError, match="archive lacks cifar-10-batches-py/data_batch_4") as e:
        prepare(resolve(str(archive)))
    one_line(e)


def test_image_folder_options_are_refused_for_cifar(tmp_path):
    folder = write_cifar10(tmp_path)
    with pytest.raises(DataError, match="--max-size only apply to image-folder datasets; .* holds CIFAR pickle"):
        resolve(str(folder), max_size=16)
