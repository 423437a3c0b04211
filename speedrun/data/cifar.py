"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) in their official "python version" pickle batches.

Read from the extracted folder or straight from the official ``.tar.gz`` (no extraction needed).
The pickles are read with an unpickler that only builds dicts, lists and numpy arrays, so a
foreign file cannot run code.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from speedrun import paths
from speedrun.data.download import brief
from speedrun.data import DataError
from speedrun.data.imageset import ImageSet, image_set


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its batches, and where to get the official archive."""

    name: str
    title: str
    folder: str  # inside the archive
    train: tuple[str, ...]
    test: str
    meta: str
    label_key: str  # per batch
    names_key: str  # in the meta file
    url: str
    md5: str  # of the archive, as published with the dataset

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[1]


LAYOUTS = {
    "cifar10": CifarLayout("cifar10", "CIFAR-10", "cifar-10-batches-py",
                           tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                           "labels", "label_names", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                           "c58f30108f718f92721af3b95e74349a"),
    "cifar100": CifarLayout("cifar100", "CIFAR-100", "cifar-100-python", ("train",), "test", "meta",
                            "fine_labels", "fine_label_names",
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                            "eb9058c3a382ffc7106e4002c42a8d85"),
}


def _files(layout: CifarLayout) -> tuple[str, ...]:
    return (*layout.train, layout.test, layout.meta)


def find_cifar_dir(path: Path) -> tuple[CifarLayout, Path] | None:
    """The CIFAR layout of ``path`` (the batches folder itself, or a folder holding it)."""
    for layout in LAYOUTS.values():
        for directory in (path, path / layout.folder):
            if all((directory / f).is_file() for f in _files(layout)):
                return layout, directory
    return None


def archive_layout(member_names: list[str]) -> CifarLayout | None:
    """Which CIFAR variant an archive holds, judged from (the first of) its member names."""
    for layout in LAYOUTS.values():
        if any(Path(n).parent.name == layout.folder and Path(n).name in _files(layout) for n in member_names):
            return layout
    return None


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(blob: bytes, where: str) -> dict[str, Any]:
    try:
        # latin1: the official files were written by Python 2; numpy needs it for their arrays.
        obj = _ArraysOnly(io.BytesIO(blob), encoding="latin1").load()
    except Exception as e:  # a broken pickle can raise nearly anything
        raise DataError(f"{where}: not a CIFAR pickle batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a CIFAR pickle batch (holds a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class CifarSource:
    """CIFAR-10/100 pickle batches: a ``cifar-10-batches-py``/``cifar-100-python`` folder or the official archive."""

    path: Path
    layout: CifarLayout
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.layout.name)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.layout.name}".encode())
        files = [self.path] if self.path.is_file() else [self.path / f for f in _files(self.layout)]
        for f in files:
            try:
                st = f.stat()
            except OSError as e:
                raise DataError(f"{self.layout.title}: cannot read {f} ({e.strerror})") from None
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def _where(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path.is_dir() else f"{self.path}:{name}"

    def _pickles(self) -> dict[str, dict[str, Any]]:
        """Every file of the layout, unpickled as soon as it is read (so raw bytes never pile up)."""
        wanted = set(_files(self.layout))
        found: dict[str, dict[str, Any]] = {}
        if self.path.is_dir():
            for name in wanted:
                try:
                    found[name] = _unpickle((self.path / name).read_bytes(), self._where(name))
                except OSError as e:
                    raise DataError(f"{self.layout.title}: cannot read {self.path / name} ({e.strerror})") from None
            return found
        try:
            with tarfile.open(self.path, "r:*") as tf:
                for member in tf:  # in archive order: a .gz is read once, front to back
                    p = Path(member.name)
                    if member.isfile() and p.parent.name == self.layout.folder and p.name in wanted:
                        blob = tf.extractfile(member).read()  # type: ignore[union-attr]
                        found[p.name] = _unpickle(blob, self._where(p.name))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{self.path}: cannot read the archive ({brief(e)})") from None
        missing = sorted(wanted - found.keys())
        if missing:
            raise DataError(f"{self.path}: archive lacks {', '.join(f'{self.layout.folder}/{m}' for m in missing)}")
        return found

    def _batch(self, batch: dict[str, Any], where: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        if "data" not in batch or self.layout.label_key not in batch:
            raise DataError(f"{where}: not a CIFAR batch (keys {sorted(batch)}; expected 'data' and "
                            f"'{self.layout.label_key}')")
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[self.layout.label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DataError(f"{where}: malformed batch (data {data.dtype} {data.shape}, {len(labels)} labels; "
                            f"expected uint8 (N, 3072) and N labels)")
        if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
            raise DataError(f"{where}: labels outside 0..{n_classes - 1}")
        # Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major: already NCHW.
        return data.reshape(-1, 3, 32, 32), labels

    def read(self) -> ImageSet:
        found = self._pickles()
        meta = found.pop(self.layout.meta)
        if self.layout.names_key not in meta:
            raise DataError(f"{self._where(self.layout.meta)}: no '{self.layout.names_key}' (is it the "
                            f"{self.layout.title} meta file?)")
        classes = tuple(_text(n) for n in meta[self.layout.names_key])
        train = [self._batch(found.pop(b), self._where(b), len(classes)) for b in self.layout.train]
        test_x, test_y = self._batch(found.pop(self.layout.test), self._where(self.layout.test), len(classes))
        train_x = np.concatenate([x for x, _ in train])
        train_y = np.concatenate([y for _, y in train])
        del train
        return image_set(self.name, train_x, train_y, test_x, test_y, classes)


def search_paths(layout: CifarLayout) -> tuple[Path, ...]:
    home = paths.datasets_dir()
    return home / layout.folder, home / layout.archive


def builtin(variant: str, *, download: bool = True) -> CifarSource:
    """Find CIFAR-10/100 under ``$SPEEDRUN_HOME/datasets``, else download the official archive."""
    from speedrun.data.download import download as fetch_checked  # the module, looked up at call time

    layout = LAYOUTS[variant]
    folder, archive = search_paths(layout)
    if find_cifar_dir(folder):
        return CifarSource(folder, layout)
    if archive.is_file():
        return CifarSource(archive, layout)
    hint = (f"{layout.title} not found at {folder} or {archive}; download {layout.url} (md5 {layout.md5}) "
            f"there, or pass --data PATH to a {layout.folder} folder or its archive")
    if not download:
        raise DataError(hint)
    try:
        fetch_checked(layout.url, archive, md5=layout.md5)
    except DataError as e:
        raise DataError(f"{hint} ({e})") from None
    return CifarSource(archive, layout)


def cifar10(*, download: bool = True) -> CifarSource:
    return builtin("cifar10", download=download)


def cifar100(*, download: bool = True) -> CifarSource:
    return builtin("cifar100", download=download)
