from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) in the IDX format, gzip-compressed when ``path`` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload, compresslevel=1) if path.suffix == ".gz" else payload)
    return path


def write_idx_dataset(directory: Path, train_x, train_y, test_x, test_y, gz: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(directory / f"train-images-idx3-ubyte{ext}", train_x)
    write_idx(directory / f"train-labels-idx1-ubyte{ext}", train_y)
    write_idx(directory / f"t10k-images-idx3-ubyte{ext}", test_x)
    write_idx(directory / f"t10k-labels-idx1-ubyte{ext}", test_y)
    return directory


def synthetic_images(n: int, *, classes: int = 4, size: int = 28, seed: int = 0, noise: float = 30.0):
    """Learnable images: a grating whose orientation (0 or 90 degrees) and frequency give the class.

    Random phase and pixel noise; mirror-invariant classes, so flip augmentation keeps labels valid.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    vertical = (labels % 2)[:, None, None]
    freq = (0.4 + 0.5 * (labels // 2))[:, None, None]
    yy, xx = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    wave = np.sin(freq * np.where(vertical, xx, yy) + phase)
    images = 128 + 100 * wave + rng.normal(0, noise, (n, size, size))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own SPEEDRUN_HOME (cache, store, measured peak)."""
    home = tmp_path / "speedrun-home"
    monkeypatch.setenv("SPEEDRUN_HOME", str(home))
    monkeypatch.delenv("SPEEDRUN_STORE", raising=False)
    return home


@pytest.fixture
def synthetic_dir(tmp_path) -> Path:
    train_x, train_y = synthetic_images(1024, seed=0)
    test_x, test_y = synthetic_images(256, seed=1)
    return write_idx_dataset(tmp_path / "synthetic", train_x, train_y, test_x, test_y)


@pytest.fixture
def unlearnable_dir(tmp_path) -> Path:
    """Labels independent of the images: no run can reach a high target on it."""
    rng = np.random.default_rng(0)
    train_x, test_x = synthetic_images(1024, seed=0)[0], synthetic_images(256, seed=1)[0]
    return write_idx_dataset(tmp_path / "unlearnable", train_x, rng.integers(0, 4, 1024).astype(np.uint8),
                             test_x, rng.integers(0, 4, 256).astype(np.uint8))


@pytest.fixture(scope="session")
def fashion_slice(tmp_path_factory) -> Path:
    """The first 6,000 training and 1,000 test images of the real Fashion-MNIST."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not installed at {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
    from speedrun.data.idx import read_idx

    arrays = [read_idx(FASHION_MNIST / f"{stem}.gz") for stem in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]
    return write_idx_dataset(tmp_path_factory.mktemp("fmnist-slice"), arrays[0][:6000], arrays[1][:6000],
                             arrays[2][:1000], arrays[3][:1000])


# A recipe small enough to train in seconds on a slice.
TINY = {"model.widths": "8,16", "model.pools": "0,1", "model.logit_scale": "1", "optim.lr": "0.5", "optim.lr_batch_size": "1024", "train.epochs": "2", "train.batch_size": "128", "eval.every_epochs": "1",
        "eval.start_frac": "0"}


# ---- CIFAR pickle batches and ImageFolder trees, written in their real formats

CIFAR_JPEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_pickle(path: Path, obj) -> Path:
    import pickle

    path.write_bytes(pickle.dumps(obj, protocol=2))  # the official files are protocol-2 pickles
    return path


def cifar_batch(n: int, *, seed: int, classes: int = 10, label_key: bytes = b"labels") -> dict:
    """One batch in the official dict layout: rows of 1024 red, 1024 green, 1024 blue values."""
    rng = np.random.default_rng(seed)
    return {b"batch_label": f"batch {seed}".encode(), label_key: [int(v) for v in rng.integers(0, classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{seed}_{i}.png".encode() for i in range(n)]}


def write_cifar10(directory: Path, *, per_batch: int = 20, test: int = 30) -> Path:
    """A ``cifar-10-batches-py`` folder: data_batch_1..5, test_batch, batches.meta (and the readme)."""
    folder = directory / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", cifar_batch(per_batch, seed=i))
    write_pickle(folder / "test_batch", cifar_batch(test, seed=0))
    write_pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_NAMES],
                                           b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    (folder / "readme.html").write_text("<html></html>")
    return folder


def write_cifar100(directory: Path, *, train: int = 60, test: int = 20) -> Path:
    """A ``cifar-100-python`` folder: train, test, meta, with fine and coarse labels."""
    folder = directory / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", train, 1), ("test", test, 2)):
        batch = cifar_batch(n, seed=seed, classes=100, label_key=b"fine_labels")
        batch[b"coarse_labels"] = [v // 5 for v in batch[b"fine_labels"]]
        write_pickle(folder / name, batch)
    write_pickle(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                                   b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return folder


def make_tar(source: Path, archive: Path, arcname: str | None = None) -> Path:
    import tarfile

    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        tf.add(source, arcname=arcname if arcname is not None else source.name)
    return archive


def write_image(path: Path, array: np.ndarray, mode: str | None = None, **save) -> Path:
    """Save ``array`` (H, W) or (H, W, C) uint8 with Pillow; the format follows the suffix."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path, **save)
    return path


def write_tree(root: Path, spec: dict[str, dict[str, int]], *, size: int = 16, seed: int = 0) -> Path:
    """An ImageFolder tree: ``{"train": {"cat": 3, ...}, "test": {...}}`` PNG images of random pixels."""
    rng = np.random.default_rng(seed)
    for split, classes in spec.items():
        for name, n in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_image(root / split / name / f"{i:03d}.png", rng.integers(0, 256, (size, size, 3)))
    return root


@pytest.fixture(scope="session")
def cifar_jpeg_slice(tmp_path_factory) -> Path:
    """The first 20 images per class and split of the real CIFAR-10 JPEG archive (400 files)."""
    import tarfile

    if not CIFAR_JPEG.is_file():
        pytest.skip(f"the real CIFAR-10 JPEG archive is absent ({CIFAR_JPEG}; only the project's shared data has it)")
    root = tmp_path_factory.mktemp("cifar10-jpeg-slice")
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR_JPEG, "r|gz") as tf:  # streamed: one pass, no seeking (test/ comes last)
        for member in tf:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3:
                continue
            key = parts[:2]
            if taken.get(key, 0) < 20:
                taken[key] = taken.get(key, 0) + 1
                tf.extract(member, root, filter="data")
            if len(taken) == 20 and all(v == 20 for v in taken.values()):
                break
    return root
