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
TINY = {"model.widths": "8,16", "optim.lr": "0.5", "train.epochs": "2", "train.batch_size": "128", "eval.every_epochs": "1",
        "eval.start_frac": "0"}
