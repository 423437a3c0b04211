"""Dataset sources: find the raw files, decode them once into a uint8 cache, load the cache.

Preparation (decode, checksum, statistics) is one-time work and is timed apart from training;
loading a prepared cache is part of every run and sits inside the time-to-accuracy clock.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from speedrun import paths
from speedrun.data import DataError
from speedrun.data.imageset import (  # noqa: F401  (re-exported: readers and users import them from here)
    ChannelMoments, ImageSet, RaggedImages, Source, check_classes, check_space, disk_full, human_bytes, image_set,
    no_space, printable)
from speedrun.data.idx import IdxError, read_idx


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# md5 of the official .gz files, as published with the dataset.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12e480ee83cd310",
}
FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def is_idx_dir(directory: Path) -> bool:
    return directory.is_dir() and all(_find_idx(directory, s) for s in _IDX_FILES.values())


@dataclass(frozen=True)
class IdxSource:
    """The four IDX files of an MNIST-family dataset in one folder (``.gz`` or raw)."""

    directory: Path
    name: str = "idx"
    classes: tuple[str, ...] | None = None

    def files(self) -> dict[str, Path]:
        found = {key: _find_idx(self.directory, stem) for key, stem in _IDX_FILES.items()}
        missing = [_IDX_FILES[k] for k, p in found.items() if p is None]
        if missing:
            raise DataError(f"{self.directory}: missing IDX files {', '.join(missing)}[.gz]")
        return found  # type: ignore[return-value]

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for key, path in sorted(self.files().items()):
            st = path.stat()
            h.update(f"{key}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def read(self) -> ImageSet:
        try:
            arrays = {key: read_idx(path) for key, path in self.files().items()}
        except IdxError as e:
            raise DataError(str(e)) from None
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DataError(f"{self.directory}: {split} images {images.shape} and labels "
                                f"{labels.shape} do not match")
        n_classes = self._check_labels(arrays)
        classes = self.classes or tuple(str(i) for i in range(n_classes))
        return image_set(self.name, arrays["train_images"][:, None], arrays["train_labels"],
                         arrays["test_images"][:, None], arrays["test_labels"], classes)

    def _check_labels(self, arrays: dict[str, np.ndarray]) -> int:
        """The number of classes; refuses labels that cannot be class indices.

        IDX files do not declare their classes, so they are taken as 0..max label; a stray large
        label (250 among 0-9) would silently add hundreds of empty classes, so every class below the
        largest label must have training images.
        """
        files = self.files()
        train, test = arrays["train_labels"], arrays["test_labels"]
        where = "test_labels" if len(test) and (not len(train) or test.max() > train.max()) else "train_labels"
        top = int(arrays[where].max()) if len(arrays[where]) else 0
        low = min((int(y.min()) for y in (train, test) if len(y)), default=0)
        if low < 0:
            raise DataError(f"{files['train_labels' if len(train) and train.min() == low else 'test_labels']}: "
                            f"negative label {low}; labels must be class indices 0..K-1")
        if self.classes is not None:
            if top >= len(self.classes):
                raise DataError(f"{files[where]}: labels outside 0..{len(self.classes) - 1} (found {top})")
            return len(self.classes)
        missing = np.setdiff1d(np.arange(top + 1), train)
        if len(missing):
            shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise DataError(f"{files[where]}: labels run to {top}, but {len(missing)} of the classes 0..{top} have "
                            f"no training image ({shown}); IDX labels must be the class indices 0..K-1 "
                            f"(is label {top} out of range?)")
        return top + 1


def _download_fashion_mnist(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for fname, md5 in FASHION_MNIST_MD5.items():
        target = dest / fname
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        tmp = target.with_suffix(".part")
        try:
            with urllib.request.urlopen(FASHION_MNIST_URL + fname, timeout=30) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise DataError(f"could not download {fname}: {e}") from None
        digest = hashlib.md5(tmp.read_bytes()).hexdigest()
        if digest != md5:
            tmp.unlink()
            raise DataError(f"downloaded {fname} fails its checksum (md5 {digest}, expected {md5}); deleted")
        tmp.replace(target)


def fashion_mnist(*, download: bool = True) -> IdxSource:
    """Find Fashion-MNIST: Debian's package, ``$SPEEDRUN_HOME/datasets``, else download it."""
    local = paths.datasets_dir() / "fashion-mnist"
    for directory in (*FASHION_MNIST_DIRS, local):
        if is_idx_dir(directory):
            return IdxSource(directory, "fashion-mnist", FASHION_MNIST_CLASSES)
    hint = (f"Fashion-MNIST not found in {', '.join(str(d) for d in (*FASHION_MNIST_DIRS, local))}; "
            "install it with `apt-get install dataset-fashion-mnist` or pass --data PATH")
    if not download:
        raise DataError(hint)
    try:
        _download_fashion_mnist(local)
    except DataError as e:
        raise DataError(f"{hint} ({e})") from None
    return IdxSource(local, "fashion-mnist", FASHION_MNIST_CLASSES)


def cifar10(*, download: bool = True) -> Source:
    from speedrun.data.cifar import builtin

    return builtin("cifar10", download=download)


def cifar100(*, download: bool = True) -> Source:
    from speedrun.data.cifar import builtin

    return builtin("cifar100", download=download)


BUILTIN = {"fashion-mnist": fashion_mnist, "cifar10": cifar10, "cifar100": cifar100}


def source_options(data: Any) -> dict[str, Any]:
    """The options a recipe's data section (``config.DataConfig``) gives ``resolve``: the image-folder
    cache's ``max_size`` and its layout (``files`` when the loader decodes as it goes)."""
    options: dict[str, Any] = {"max_size": data.max_size} if data.max_size else {}
    layout = "files" if data.loader == "decode" else data.layout
    return {**options, "layout": layout} if layout != "square" else options


def resolve(source: str | Path, *, download: bool = True, max_size: int | None = None,
            holdout_frac: float | None = None, strict: bool = False, workers: int | None = None,
            layout: str | None = None) -> Source:
    """A built-in dataset name or a path, as a Source; raises DataError with a fix.

    Paths may be a folder of MNIST-style IDX files, CIFAR-10/100 pickle batches (folder or
    official archive) or an ImageFolder tree (folder or tar archive). ``max_size``,
    ``holdout_frac``, ``layout`` (square, aspect, files), ``strict`` and ``workers`` are options of
    ImageFolder trees.

    >>> resolve("cifar10", download=False).name  # doctest: +SKIP
    'cifar10'
    """
    from speedrun.data import cifar, imagefolder
    from speedrun.data.download import is_archive, peek_members

    folder_options = {k: v for k, v in (("max_size", max_size), ("holdout_frac", holdout_frac), ("layout", layout))
                      if v is not None and not (k == "layout" and v == "square")}

    def no_tree_options(found: Source) -> Source:
        if folder_options:
            flags = ", ".join("--" + k.replace("_", "-") + (f" {v}" if k == "layout" else "")
                              for k, v in folder_options.items())
            what = "CIFAR pickle batches" if isinstance(found, cifar.CifarSource) else "IDX files"
            raise DataError(f"{flags} only apply to image-folder datasets; {source} holds {what}")
        return found

    if isinstance(source, str) and source in BUILTIN:
        return no_tree_options(BUILTIN[source](download=download))
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(BUILTIN)
        raise DataError(f"dataset not found: {path} (not a path, nor a built-in name: {names})")
    if not os.access(path, os.R_OK):
        raise DataError(f"dataset not readable: {path} (check its permissions)")
    tree_source = functools.partial(imagefolder.ImageFolderSource, path, imagefolder.imagefolder_name(path),
                                    strict=strict, workers=workers, **folder_options)
    if path.is_dir():
        if is_idx_dir(path):
            return no_tree_options(IdxSource(path, path.name or "idx"))
        found = cifar.find_cifar_dir(path)
        if found:
            return no_tree_options(cifar.CifarSource(found[1], found[0]))
        if imagefolder.find_tree_root(path):
            return tree_source()
    elif is_archive(path):
        members = peek_members(path)
        layout = cifar.archive_layout(members)
        if layout:
            return no_tree_options(cifar.CifarSource(path, layout))
        if imagefolder.looks_like_tree(members):
            return tree_source()
    raise DataError(f"{path}: unrecognised dataset layout; expected a folder holding the four "
                    "MNIST-style IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                    "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]), CIFAR pickle batches "
                    "(cifar-10-batches-py/, cifar-100-python/ or their .tar.gz), or an image folder tree "
                    "(train/<class>/<images> with val/ or test/ beside it, or a .tar.gz of one)")


# ---------------------------------------------------------------- the uint8 cache

_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class Prepared:
    """A dataset decoded into the cache; ``prepare_s`` is 0 when it was already there."""

    directory: Path
    prepare_s: float
    built: bool


META_VERSION = 2  # 1: no source, counts, created, details


def cache_path(source: Source, fingerprint: str | None = None) -> Path:
    """Where ``source`` is (or would be) prepared."""
    return paths.cache_dir() / f"{source.name.replace('/', '_')}-{fingerprint or source.fingerprint()}"


def source_location(source: Source) -> str:
    """The file or folder a source reads, for people (meta.json, ``speedrun data info``)."""
    where = getattr(source, "path", None) or getattr(source, "directory", None)
    return printable(str(Path(where).resolve())) if where is not None else source.name


def prepare(source: Source) -> Prepared:
    """Decode ``source`` into ``$SPEEDRUN_HOME/cache`` unless a cache of the same fingerprint exists.

    Atomic: the arrays are written into a temporary folder that is renamed into place, so an
    interrupted preparation leaves no half cache behind.
    """
    fingerprint = source.fingerprint()
    target = cache_path(source, fingerprint)
    if (target / "meta.json").is_file():
        check_classes(source_location(source), tuple(read_meta(target)["classes"]))  # caches made before the check
        return Prepared(target, 0.0, False)
    start = time.perf_counter()
    read_into = getattr(source, "read_into", None)
    data = None if read_into else source.read()
    if data is not None:
        check_classes(source_location(source), data.classes, data.train_labels)
    needed = None if data is None else sum(getattr(data, key).nbytes for key in _ARRAYS)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    except OSError as e:
        raise DataError(f"cannot write the dataset cache under {target.parent}: {e}") from None
    try:
        if data is None:
            data = read_into(tmp)  # writes the arrays itself, incrementally, and checks its space
            check_classes(source_location(source), data.classes, data.train_labels)
        else:
            check_space(target.parent, needed)
            for key in _ARRAYS:
                np.save(tmp / f"{key}.npy", getattr(data, key))
        k = data.num_classes
        meta = {"name": data.name, "classes": list(data.classes), "mean": data.mean, "std": data.std,
                "train": len(data.train_labels), "test": len(data.test_labels),
                "layout": data.layout, "shape": [data.channels, *data.image_size], "fingerprint": fingerprint,
                "prepare_s": time.perf_counter() - start,
                "version": META_VERSION, "source": source_location(source), "source_type": type(source).__name__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "counts": {"train": np.bincount(data.train_labels, minlength=k).tolist(),
                           "test": np.bincount(data.test_labels, minlength=k).tolist()},
                "details": data.details}
        if data.layout == "files":  # where the files are read from as training decodes them
            meta["files_root"] = str(data.train_images.root)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(target)
        except OSError:  # another process prepared it meanwhile
            if not (target / "meta.json").is_file():
                raise
    except OSError as e:
        full = disk_full(e, target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # first: the free space reported is then what the disk had
        if full:
            raise no_space(target.parent, needed) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(target, time.perf_counter() - start, True)


def read_meta(directory: Path) -> dict[str, Any]:
    """A cache's meta.json (older caches lack the fields added since version 1)."""
    try:
        return json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"dataset cache {directory} is unreadable ({e}); delete it to prepare again") from None


def load_prepared(directory: Path, *, mmap: bool = False) -> ImageSet:
    """Read a prepared cache into memory (part of every run, so inside the clock).

    With ``mmap`` the arrays are read-only memory maps: nothing is read until it is indexed, so a set
    larger than memory can be streamed (``StreamLoader``) and its size known without reading it.
    An aspect cache's images are ``RaggedImages``; a files cache's, ``FileImages`` (nothing is read).
    """
    try:
        meta = json.loads((directory / "meta.json").read_text())
        layout = meta.get("layout", "square")
        labels = {key: np.load(directory / f"{key}.npy") for key in ("train_labels", "test_labels")}
        if layout == "square":
            images = {key: np.load(directory / f"{key}.npy", mmap_mode="r" if mmap else None)
                      for key in ("train_images", "test_images")}
        else:
            images = {f"{split}_images": _load_images(directory, meta, split, mmap) for split in ("train", "test")}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"dataset cache {directory} is unreadable ({e}); delete it to prepare again") from None
    return ImageSet(meta["name"], images["train_images"], labels["train_labels"], images["test_images"],
                    labels["test_labels"], tuple(meta["classes"]), tuple(meta["mean"]), tuple(meta["std"]),
                    input_size=None if layout == "square" else tuple(meta["shape"][1:]))


def _load_images(directory: Path, meta: dict[str, Any], split: str, mmap: bool) -> Any:
    """One split of an aspect cache (``RaggedImages``) or of a files cache (``FileImages``)."""
    from speedrun.data.imagefolder import FileImages

    channels = meta["shape"][0]
    if meta["layout"] == "files":
        root = Path(meta["files_root"])
        if not root.is_dir():
            raise DataError(f"the image files of cache {directory} are gone ({printable(str(root))}); delete the "
                            "cache and prepare again")
        return FileImages.load(directory, split, root, meta["details"]["options"]["max_size"], channels)
    pixels = directory / f"{split}_images.u8"
    # Copy-on-write ("c"), so torch can wrap the map without a copy; nothing ever writes to it.
    data = (np.memmap(pixels, np.uint8, mode="c") if mmap else np.fromfile(pixels, np.uint8)) \
        if pixels.stat().st_size else np.empty(0, np.uint8)
    return RaggedImages(data, np.load(directory / f"{split}_images_index.npy"), channels)
