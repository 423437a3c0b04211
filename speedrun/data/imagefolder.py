"""ImageFolder trees of JPEG/PNG files, decoded once with Pillow (in threads) into the uint8 cache.

Layout (as ImageNet's)::

    root/train/<class>/<image>      classes are the sorted folder names of train/
    root/val/<class>/<image>        or root/test/...; without either, a held-out fraction of train/

or a ``.tar.gz`` of such a tree, extracted once under ``$SPEEDRUN_HOME/cache/extracted/``.

Three layouts of the cache:

- ``square`` (the default): every image decoded to the one cache size. When all images share a size no
  larger than ``max_size`` they are kept as they are; otherwise the shorter side is resized (JPEGs first
  shrunk by libjpeg's draft mode) and the centre cropped square.
- ``aspect``: each image at its own aspect ratio, its shorter side capped at ``max_size`` (smaller
  images kept as they are), back to back in one flat buffer with an (offset, height, width) index
  (``RaggedImages``). Training crops are then drawn from the whole stored picture, per image and epoch.
- ``files``: no pixels at all, only the checked list of files and statistics from a sample; the loader
  decodes the JPEGs as it trains (``FileImages``), for sets too large to cache.

Every image is turned upright by its EXIF orientation. Arrays are written front to back (through
short-lived memory maps, or appended to a raw file), so preparing a large tree never holds it twice in RAM.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import math
import os
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from speedrun import paths
from speedrun.console import new_console
from speedrun.data.download import archive_stem, extract_once, is_archive
from speedrun.data import DataError
from speedrun.data.imageset import (ChannelMoments, ImageSet, RaggedImages, check_space, disk_full, no_space,
                                    printable)

DEFAULT_MAX_SIZE = 64  # pixels; 1.28M ImageNet images at 64x64 are 16 GB, small enough to sit on one GPU
DEFAULT_HOLDOUT_FRAC = 0.1
HELD_OUT_DIRS = ("val", "test")  # the first that exists is the test split
LAYOUTS = ("square", "aspect", "files")
DECODER_VERSION = 2  # part of the fingerprint: bump when decoding changes so old caches are not reused (2: EXIF)
STATS_SAMPLE = 1024  # files layout: training images decoded for the mean and std
_ORIENTATION = 0x0112  # the EXIF tag
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_NAMED_FAILURES = 3  # bad files named in the warning

err = new_console(stderr=True, highlight=False)


def _say(message: str) -> None:
    err.print(message, markup=False)  # paths may hold [brackets]


# ---------------------------------------------------------------- the tree

def find_tree_root(path: Path) -> Path | None:
    """``path`` when it holds ``train/``, or its only sub-folder when that does (archives often wrap a tree)."""
    if (path / "train").is_dir():
        return path
    try:
        subdirs = [d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except OSError:
        return None
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    return None


def looks_like_tree(member_names: Iterable[str]) -> bool:
    """Whether archive members look like ``[wrapper/]train|val|test/<class>/<file>``."""
    return any(part in ("train", *HELD_OUT_DIRS) for name in member_names
               for part in PurePosixPath(name).parts[:-2])


@dataclass(frozen=True)
class Listing:
    """The files of a tree, in a fixed order: sorted by class, then by path."""

    root: Path
    classes: tuple[str, ...]
    train: tuple[tuple[str, int], ...]  # (path, label)
    test: tuple[tuple[str, int], ...]
    test_from: str  # "val/", "test/" or "10% of train/"


def _class_dirs(split_dir: Path) -> list[os.DirEntry]:
    """The class folders of ``split_dir``, sorted by name (hidden names skipped)."""
    try:
        return sorted((e for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")),
                      key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot list {printable(str(split_dir))}: {e.strerror}") from None


def _class_files(entries: list[os.DirEntry]) -> dict[str, list[str]]:
    """Files under each class folder (sub-folders included, hidden names skipped), by class name.

    A name that is not UTF-8 (from an archive made on Windows) is kept: the files open by their raw
    names, and the class is named with ``\\xNN`` escapes (``printable``).
    """
    found: dict[str, list[str]] = {}
    for entry in entries:
        name = printable(entry.name)
        if name in found:  # an escaped name equal to a folder literally named so
            raise DataError(f"{printable(entry.path)}: two class folders are both named {name!r} once "
                            "non-UTF-8 bytes are escaped; rename one")
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(entry.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
        found[name] = files
    return found


def check_links(root: Path, split_dirs: list[Path], entries: list[os.DirEntry]) -> None:
    """Refuse a class folder that is a link to another class folder, into one, or to a folder holding
    the tree: it would become a silent duplicate class (or, from val/ into train/, a test set of
    training images). Links to folders elsewhere (a tree assembled from links) are fine."""
    def real_parts(path: str | Path) -> tuple[str, ...]:
        return Path(os.path.realpath(path)).parts

    # Sorted by path components, a folder is directly followed by the folders inside it.
    folders = sorted([(real_parts(d), d, False) for d in split_dirs]
                     + [(real_parts(e.path), Path(e.path), e.is_symlink()) for e in entries])
    for (a, a_path, a_link), (b, b_path, b_link) in zip(folders, folders[1:]):
        if b[:len(a)] != a or not (a_link or b_link):
            continue
        link, other = (b_path, a_path) if b_link else (a_path, b_path)
        how = "the same folder as" if a == b else "inside" if link == b_path else "a folder holding"
        raise DataError(f"{printable(str(root))}: class folder {printable(os.path.relpath(link, root))} is a link to "
                        f"{printable(os.path.realpath(link))}, {how} {printable(os.path.relpath(other, root))}: it "
                        "would be a duplicate class; remove the link, or copy the images")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def holdout_split(files: list[str], frac: float) -> tuple[list[str], list[str]]:
    """Split one class's files into (train, held out), deterministically.

    The files whose names hash lowest are held out: ``round(frac * n)`` of them, at least one
    when the class has two or more, never all. The choice depends only on the names, not on the
    listing order or on other classes.
    """
    n = len(files)
    k = 0 if n < 2 else min(n - 1, max(1, round(frac * n)))
    held = set(sorted(files, key=lambda f: hashlib.md5(os.fsencode(os.path.basename(f))).digest())[:k])
    return [f for f in files if f not in held], [f for f in files if f in held]


def scan(root: Path, *, holdout_frac: float = DEFAULT_HOLDOUT_FRAC) -> Listing:
    """List a tree and check it: classes, empty class folders, test classes unknown to train."""
    train_dir = root / "train"
    held_dir = next((root / d for d in HELD_OUT_DIRS if (root / d).is_dir()), None)
    train_entries, test_entries = _class_dirs(train_dir), _class_dirs(held_dir) if held_dir else []
    check_links(root, [train_dir] + ([held_dir] if held_dir else []), train_entries + test_entries)
    train, test = _class_files(train_entries), _class_files(test_entries)
    if not train:
        raise DataError(f"{train_dir}: no class folders (expected train/<class>/<image files>)")
    classes = tuple(train)
    for split_dir, found in ((train_dir, train), (held_dir, test)):
        empty = [c for c, files in found.items() if not files]
        if empty:
            raise DataError(f"{split_dir}: empty class folder{'s' if len(empty) > 1 else ''} "
                            f"{', '.join(empty)} (every class folder needs at least one image)")
    unknown = [c for c in test if c not in train]
    if unknown:
        raise DataError(f"{held_dir}: class folder{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"not in {train_dir} (test classes must be training classes)")
    label = {c: i for i, c in enumerate(classes)}
    if held_dir is not None:
        test_from = f"{held_dir.name}/"
    else:
        test_from = f"{holdout_frac:.0%} of train/"
        for c in classes:
            train[c], test[c] = holdout_split(train[c], holdout_frac)
        if not any(test.values()):
            raise DataError(f"{root}: no val/ or test/ folder, and too few images per class to hold out "
                            f"{holdout_frac:.0%} for testing")
    return Listing(root, classes, tuple((f, label[c]) for c in classes for f in train[c]),
                   tuple((f, label[c]) for c in test for f in test[c]), test_from)


# ---------------------------------------------------------------- decoding one image

def cache_layout(sizes: Counter[tuple[int, int]], all_gray: bool, max_size: int) -> tuple[int, int, int]:
    """(channels, height, width) of the cache, from the (width, height) sizes of all images.

    One size with both sides <= ``max_size``: kept. Otherwise square: ``max_size`` when all images
    share a size too large, else the most common shorter side, capped at ``max_size``.
    One channel only when every image is greyscale.

    >>> cache_layout(Counter({(32, 32): 10}), False, 64), cache_layout(Counter({(500, 375): 3}), False, 64)
    ((3, 32, 32), (3, 64, 64))
    """
    channels = 1 if all_gray else 3
    if len(sizes) == 1:
        (w, h), = sizes
        if max(w, h) <= max_size:
            return channels, h, w
        return channels, max_size, max_size
    shorter: Counter[int] = Counter()
    for (w, h), n in sizes.items():
        shorter[min(w, h)] += n
    side = min(max_size, max(shorter, key=lambda s: (shorter[s], s)) if shorter else max_size)
    return channels, side, side


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode == mode:
        return img
    if img.mode.startswith("I;16"):  # 16-bit grey: keep the high byte
        img = Image.fromarray((np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow's advice for palettes with transparency
    return img.convert(mode)


def _fit(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers width x height, keeping its aspect, and take the centre."""
    w, h = img.size
    scale = max(width / w, height / h)
    box_w, box_h = width / scale, height / scale
    left, top = (w - box_w) / 2, (h - box_h) / 2
    return img.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h))


class Aspect(NamedTuple):
    """The aspect layout's decoding target: ``channels``, and the shorter side capped at ``max_size``."""

    channels: int
    max_size: int


Layout = tuple[int, int, int] | Aspect  # (channels, height, width) of the square layout, or Aspect


def _upright_size(img: Image.Image) -> tuple[tuple[int, int], int]:
    """(width, height) once turned upright by the EXIF orientation, and that orientation (1: as stored)."""
    try:
        orientation = int(img.getexif().get(_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block: the pixels may still be fine
        orientation = 1
    w, h = img.size
    return ((h, w) if orientation in (5, 6, 7, 8) else (w, h)), orientation


def _decode(img: Image.Image, scale: float, mode: str, orientation: int) -> Image.Image:
    """The pixels of an opened file, upright and in ``mode``. A JPEG whose pixels will be shrunk by
    ``scale`` < 1 is decoded at the smallest of libjpeg's 1/2, 1/4, 1/8 scales still at least that large
    (an 8000x6000 photo decodes as 1000x750 for a 160 px cache)."""
    if scale < 1 and img.format == "JPEG":
        img.draft(img.mode, (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    return _to_mode(img, mode)


def aspect_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """(width, height) with the shorter side capped at ``max_size``, aspect kept (rounded to whole pixels).

    >>> aspect_size(500, 375, 160), aspect_size(100, 80, 160)
    ((213, 160), (100, 80))
    """
    short = min(width, height)
    if short <= max_size:
        return width, height
    scale = max_size / short
    return (max_size, max(1, round(height * scale))) if width == short else (max(1, round(width * scale)), max_size)


def decode_image(path: str, layout: Layout) -> tuple[np.ndarray, tuple[int, int], bool]:
    """One file as a uint8 (C, H, W) array of ``layout``, with its own upright (width, height) and greyness.

    Square layouts give every file ``layout``'s size; ``Aspect`` keeps each file's aspect ratio with the
    shorter side capped (``aspect_size``).
    """
    channels = layout[0]
    with Image.open(path) as img:
        if img.format != "JPEG":  # a PNG's EXIF may follow its pixels: reading it loads them, and a broken
            img.load()  # stream would then be swallowed with the EXIF's errors, the pixels left half-decoded
        size, orientation = _upright_size(img)
        gray = img.mode in _GRAY_MODES
        if isinstance(layout, Aspect):
            width, height = aspect_size(*size, layout.max_size)
            scale = width / size[0]
        else:
            _, height, width = layout
            scale = max(width / size[0], height / size[1])
        img = _decode(img, scale, "L" if channels == 1 else "RGB", orientation)
        if img.size != (width, height):
            img = (img.resize((width, height), Image.Resampling.BICUBIC) if isinstance(layout, Aspect)
                   else _fit(img, width, height))
        array = np.asarray(img)
    return (array[None] if channels == 1 else array.transpose(2, 0, 1)), size, gray


def _reason(e: Exception) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image"
    if isinstance(e, Image.DecompressionBombError):
        return f"too large: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's limit against decompression bombs)"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, FileNotFoundError):
        return "missing or a broken link"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return "truncated" if "truncated" in text else text[:80]


@dataclass(frozen=True)
class Chunk:
    """Decoded images of one chunk of a split; ``kept`` indexes the chunk's files that decoded.

    ``images``: an (n, C, H, W) array (square layout), ``RaggedImages`` (aspect) or None (files layout,
    whose files are only opened, to check they are images).
    """

    split: int
    start: int
    images: np.ndarray | RaggedImages | None
    kept: list[int]
    failed: list[tuple[str, str]]
    sizes: Counter[tuple[int, int]]
    all_gray: bool


def _decode_chunk(task: tuple[int, int, list[str], Layout]) -> Chunk:
    split, start, files, layout = task
    square = not isinstance(layout, Aspect)
    images: Any = np.empty((len(files), *layout), np.uint8) if square else []
    kept, failed, sizes, all_gray = [], [], Counter(), True
    for i, path in enumerate(files):
        try:
            image, size, gray = decode_image(path, layout)
        except Exception as e:  # Pillow raises many types for bad files; each one is skipped and named
            failed.append((path, _reason(e)))
            continue
        if square:
            images[len(kept)] = image
        else:
            images.append(image)
        kept.append(i)
        sizes[size] += 1
        all_gray &= gray
    return Chunk(split, start, images[:len(kept)] if square else RaggedImages.from_list(images), kept, failed,
                 sizes, all_gray)


def _check_chunk(task: tuple[int, int, list[str], Any]) -> Chunk:
    """The files layout's pass: open each file's header (an image, and which), decode nothing."""
    split, start, files, _ = task
    kept, failed, sizes, all_gray = [], [], Counter(), True
    for i, path in enumerate(files):
        try:
            with Image.open(path) as img:
                size, _ = _upright_size(img)
                all_gray &= img.mode in _GRAY_MODES
        except Exception as e:
            failed.append((path, _reason(e)))
            continue
        kept.append(i)
        sizes[size] += 1
    return Chunk(split, start, None, kept, failed, sizes, all_gray)


def probe(files: list[str], *, samples: int = 64) -> tuple[Counter[tuple[int, int]], bool]:
    """Sizes and greyness of a spread of files, from their headers only (cheap)."""
    sizes, all_gray = Counter(), True
    for path in files[:: max(1, len(files) // samples)][:samples]:
        try:
            with Image.open(path) as img:
                sizes[_upright_size(img)[0]] += 1
                all_gray &= img.mode in _GRAY_MODES
        except Exception:  # a bad file is found and reported by the decode pass
            continue
    return sizes, all_gray


# ---------------------------------------------------------------- decoding a tree into .npy files

class NpyAppender:
    """Fills a uint8 .npy file front to back through short-lived memory maps, so RSS stays flat."""

    REMAP_BYTES = 64 << 20  # mapped pages count as resident until unmapped: bounds RSS growth

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
        reserve(path)
        self.path, self.shape, self.count = path, shape, 0
        self._map: np.ndarray | None = None
        self._mapped = 0

    def append(self, images: np.ndarray) -> None:
        if self._map is None:
            self._map = np.load(self.path, mmap_mode="r+")
        self._map[self.count:self.count + len(images)] = images
        self.count += len(images)
        self._mapped += images.nbytes
        if self._mapped >= self.REMAP_BYTES:
            self._release()

    def _release(self) -> None:
        if self._map is not None:
            self._map.flush()
        self._map, self._mapped = None, 0

    def finish(self) -> np.ndarray:
        """The filled array (read-only map); shortened by copying when files were skipped."""
        self._release()
        if self.count < self.shape[0]:
            short = self.path.with_name(self.path.stem + ".short.npy")
            src = np.load(self.path, mmap_mode="r")
            dst = np.lib.format.open_memmap(short, mode="w+", dtype=np.uint8, shape=(self.count, *self.shape[1:]))
            reserve(short)
            step = max(1, self.REMAP_BYTES // max(1, int(np.prod(self.shape[1:]))))
            for i in range(0, self.count, step):
                stop = min(i + step, self.count)
                dst[i:stop] = src[i:stop]
            dst.flush()
            del src, dst
            short.replace(self.path)
        return np.load(self.path, mmap_mode="r")


def reserve(path: Path) -> None:
    """Allocate a (sparse) file's blocks now. Written through a memory map, a sparse file on a disk
    that fills up kills the process with SIGBUS; reserved, the full disk is an OSError here instead."""
    fallocate = getattr(os, "posix_fallocate", None)  # Linux, not macOS
    if fallocate is None:
        return
    with open(path, "r+b") as f:
        try:
            fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # EOPNOTSUPP, EINVAL: the file system cannot reserve; its writes will tell


class RaggedAppender:
    """Appends images of varying sizes to a raw uint8 file (``<stem>.u8``), recording each one's
    (offset, height, width) for ``<stem>_index.npy``; plain sequential writes, so RSS stays flat."""

    def __init__(self, stem: Path, channels: int) -> None:
        self.path, self.index_path = stem.with_suffix(".u8"), stem.with_name(stem.name + "_index.npy")
        self.channels, self.count, self._offset = channels, 0, 0
        self._index: list[np.ndarray] = []
        self._file = open(self.path, "wb")

    def append(self, images: RaggedImages) -> None:
        data = np.asarray(images.data)
        self._file.write(memoryview(np.ascontiguousarray(data)))
        index = images.index.copy()
        index[:, 0] += self._offset
        self._index.append(index)
        self._offset += data.size
        self.count += len(images)

    def finish(self) -> RaggedImages:
        """The written images, memory-mapped read-only."""
        self._file.close()
        index = np.concatenate(self._index) if self._index else np.zeros((0, 3), np.int64)
        np.save(self.index_path, index)
        return RaggedImages(_map_raw(self.path), index, self.channels)

    def close(self) -> None:
        self._file.close()


def _map_raw(path: Path) -> np.ndarray:
    """A raw uint8 file as a read-only array (memory-mapped; numpy cannot map an empty file)."""
    return np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.empty(0, np.uint8)


@dataclass(frozen=True)
class Decoded:
    images: tuple[Any, Any]  # train, test (read-only maps of the written files: arrays or RaggedImages)
    labels: tuple[np.ndarray, np.ndarray]
    failed: list[tuple[str, str]]
    sizes: Counter[tuple[int, int]]
    all_gray: bool
    moments: ChannelMoments
    seconds: float
    threads: int  # decode threads actually used


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _chunks(listing: Listing, layout: Any, chunk: int) -> list:
    return [(s, i, [f for f, _ in files[i:i + chunk]], layout)
            for s, files in enumerate((listing.train, listing.test)) for i in range(0, len(files), chunk)]


def _results(tasks: list, threads: int, work: Callable[[Any], Chunk] | None = None) -> Iterator[Chunk]:
    """``work(task)`` (default: decode the chunk) for each task, in task order (so the cache's order is
    deterministic).

    Threads, not processes: Pillow releases the GIL while it reads, decodes and resizes, so threads
    scale where decoding is the work (on this 2-core machine, 400x300 JPEGs: 1.7x serial, where two
    processes gave 1.5x, pickling the arrays back). Tiny images are bound by Pillow's Python-level header
    parsing and gain nothing (CIFAR's 32x32: ~1.0x, processes 1.4x) — a few seconds of a one-time step,
    traded for no worker processes at all: nothing re-imports the caller's script (which, without
    `if __name__ == "__main__":`, made process workers fail forever) and nothing to pickle.
    """
    work = work or _decode_chunk
    if threads <= 1:
        yield from map(work, tasks)
        return
    pending: deque[Future[Chunk]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="speedrun-decode") as pool:
        try:
            for task in tasks:  # a bounded window of chunks in flight keeps memory flat
                pending.append(pool.submit(work, task))
                if len(pending) > 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # interrupted or closed early: drop the queued chunks; the pool waits for the running ones
            for future in pending:
                future.cancel()


def _written(directory: Path) -> list[Path]:
    """Every file decoding may write into ``directory`` (the partial ones are removed when the disk fills)."""
    names = [f"{split}_{kind}" for split in ("train", "test") for kind in ("images", "labels")]
    return [directory / f"{n}{ext}" for n in names for ext in (".npy", ".short.npy", ".u8", "_index.npy")]


def decode_tree(listing: Listing, layout: Layout, directory: Path, *, workers: int,
                chunk: int | None = None, progress: bool = False, image_bytes: float | None = None) -> Decoded:
    """Decode every file of ``listing`` into ``directory``: ``{train,test}_{images,labels}.npy`` for a
    square layout; for ``Aspect``, ``{train,test}_images.u8`` (raw pixels) with ``_images_index.npy``.

    The disk must hold the arrays at their full size (checked first; ``image_bytes``, the mean bytes of
    one image, estimates it for the aspect layout); a disk full all the same is a DataError naming the
    space needed, with the partial files removed.
    """
    total = len(listing.train) + len(listing.test)
    per_image = image_bytes if image_bytes is not None else math.prod(layout)
    needed = int(total * (per_image + 8))  # uint8 pixels, int64 labels
    check_space(directory.parent, needed - sum(f.stat().st_size for f in _written(directory) if f.exists()))
    try:
        return _decode_into(listing, layout, directory, workers=workers, chunk=chunk, progress=progress)
    except OSError as e:
        if not disk_full(e, directory):
            raise
        for f in _written(directory):
            f.unlink(missing_ok=True)
        raise no_space(directory.parent, needed) from None


def _decode_into(listing: Listing, layout: Layout, directory: Path, *, workers: int,
                 chunk: int | None, progress: bool) -> Decoded:
    splits = (listing.train, listing.test)
    total = sum(map(len, splits))
    if chunk is None:  # enough chunks to balance the workers, few enough to keep transfers cheap
        chunk = max(8, min(256, math.ceil(total / (4 * workers))))
    outs: list[Any] = []
    try:
        for name, files in zip(("train", "test"), splits):
            outs.append(RaggedAppender(directory / f"{name}_images", layout[0]) if isinstance(layout, Aspect)
                        else NpyAppender(directory / f"{name}_images.npy", (len(files), *layout)))
        decoded = _decode_chunks(listing, layout, outs, chunk=chunk, workers=workers, progress=progress)
    finally:
        for out in outs:
            if isinstance(out, RaggedAppender):
                out.close()
    return decoded


def _progress_bar(what: str, progress: bool) -> Progress:
    return Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                    TimeRemainingColumn(), console=err, transient=True, disable=not (progress and err.is_terminal))


def _decode_chunks(listing: Listing, layout: Layout, outs: list[Any], *, chunk: int, workers: int,
                   progress: bool) -> Decoded:
    splits = (listing.train, listing.test)
    labels: list[list[int]] = [[], []]
    failed: list[tuple[str, str]] = []
    sizes: Counter[tuple[int, int]] = Counter()
    all_gray = True
    moments = ChannelMoments(layout[0])
    start = time.perf_counter()
    tasks = _chunks(listing, layout, chunk)
    threads = min(workers, len(tasks))
    bar = _progress_bar("decoding", progress)
    results = _results(tasks, threads)
    try:
        with bar:
            task = bar.add_task("decode", total=sum(map(len, splits)))
            for c in results:
                outs[c.split].append(c.images)
                labels[c.split] += [splits[c.split][c.start + i][1] for i in c.kept]
                if c.split == 0:
                    moments.add(c.images)
                failed += c.failed
                sizes += c.sizes
                all_gray &= c.all_gray
                bar.advance(task, len(c.kept) + len(c.failed))
    finally:
        results.close()  # cancels the queued chunks when decoding was interrupted
    seconds = time.perf_counter() - start
    arrays = tuple(out.finish() for out in outs)
    label_arrays = tuple(np.asarray(y, dtype=np.int64) for y in labels)
    for name, y in zip(("train", "test"), label_arrays):
        np.save(outs[0].path.parent / f"{name}_labels.npy", y)
    return Decoded(arrays, label_arrays, failed, sizes, all_gray, moments, seconds,  # type: ignore[arg-type]
                   max(1, threads))


# ---------------------------------------------------------------- the source

def _fmt_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class ImageFolderSource:
    """An ImageFolder tree of JPEG/PNG files (or a tar archive of one), as a Source.

    >>> source = ImageFolderSource(Path("~/data/imagenette").expanduser(), max_size=64)  # doctest: +SKIP
    >>> speedrun.data.prepare(source)  # doctest: +SKIP
    """

    path: Path  # the tree's root, or a .tar[.gz] of it
    name: str = "imagefolder"
    _: KW_ONLY
    max_size: int = DEFAULT_MAX_SIZE
    holdout_frac: float = DEFAULT_HOLDOUT_FRAC
    strict: bool = False  # a file that cannot be decoded is an error rather than skipped
    workers: int | None = None  # decode threads; default: every core this process may use
    chunk: int | None = None  # files per task handed to a worker; default: balanced
    progress: bool = True  # a progress bar, when stderr is a terminal
    layout: str = "square"  # square, aspect (shorter side capped at max_size) or files (decoded on access)

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise DataError(f"max_size must be >= 1 pixel; got {self.max_size}")
        if self.layout not in LAYOUTS:
            raise DataError(f"layout must be one of {', '.join(LAYOUTS)}; got {self.layout!r}")
        if not 0 < self.holdout_frac < 1:
            raise DataError(f"holdout_frac must be between 0 and 1; got {self.holdout_frac}")

    @property
    def is_archive(self) -> bool:
        return is_archive(self.path)

    def _archive_key(self) -> str:
        st = self.path.stat()
        return hashlib.sha256(f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]

    def extracted_dir(self) -> Path:
        return paths.cache_dir() / "extracted" / f"{archive_stem(self.path)}-{self._archive_key()}"

    def root(self) -> Path:
        """The tree's root folder, extracting the archive first (once) when the source is one."""
        base = extract_once(self.path, self.extracted_dir()) if self.is_archive else self.path
        root = find_tree_root(base)
        if root is None:
            raise DataError(f"{self.path}: no train/<class>/ folders{' in the archive' if self.is_archive else ''}")
        return root

    def fingerprint(self) -> str:
        """Hash of file names, sizes and modification times (or the archive's), and the options."""
        h = hashlib.sha256(f"imagefolder v{DECODER_VERSION} max_size={self.max_size} "
                           f"holdout_frac={self.holdout_frac} layout={self.layout}\n".encode())
        if self.is_archive:
            h.update(self._archive_key().encode())
        else:
            listing = scan(self.root(), holdout_frac=self.holdout_frac)
            h.update(f"{listing.root.resolve()}\n".encode())
            for split, files in (("train", listing.train), ("test", listing.test)):
                for path, label in files:
                    try:
                        st = os.stat(path)
                        stamp = f"{st.st_size}:{st.st_mtime_ns}"
                    except OSError:
                        stamp = "unreadable"
                    line = f"{split}:{label}:{os.path.relpath(path, listing.root)}:{stamp}\n"
                    h.update(line.encode("utf-8", "surrogateescape"))  # names need not be UTF-8
        return h.hexdigest()[:16]

    def read(self) -> ImageSet:
        with tempfile.TemporaryDirectory(prefix="speedrun-decode-") as tmp:
            data = self.read_into(Path(tmp))
            return dataclasses.replace(data, train_images=np.array(data.train_images),
                                       test_images=np.array(data.test_images))

    def read_into(self, directory: Path) -> ImageSet:
        """Decode into ``directory/*.npy`` (the cache being prepared) and return the set, memory-mapped."""
        listing = scan(self.root(), holdout_frac=self.holdout_frac)
        escaped = [c for c in listing.classes if not (listing.root / "train" / c).is_dir()]  # see _class_files
        if escaped:
            _say(f"warning: {_plural(len(escaped), 'class folder name')} not UTF-8, named with \\x escapes: "
                 f"{', '.join(escaped[:3])}{', ...' if len(escaped) > 3 else ''}")
        workers = self.workers or default_workers()
        if self.layout == "files":
            return self._index_into(listing, directory, workers)
        sizes, all_gray = probe([f for f, _ in listing.train + listing.test])
        layout = self._layout(sizes, all_gray)
        decoded = decode_tree(listing, layout, directory, workers=workers, chunk=self.chunk,
                              progress=self.progress, image_bytes=self._image_bytes(layout, sizes))
        self._check_failures(listing, decoded.failed)
        actual = self._layout(decoded.sizes, decoded.all_gray)
        if actual != layout:  # the header sample missed a size or a colour image: decode again, rarely
            _say(f"the sampled headers missed some image sizes or colours; decoding again as "
                 f"{'x'.join(map(str, actual))}")
            decoded = decode_tree(listing, actual, directory, workers=workers, chunk=self.chunk,
                                  progress=self.progress, image_bytes=self._image_bytes(actual, decoded.sizes))
            layout = actual
        n = sum(map(len, decoded.labels))
        _say(f"decoded {_plural(n, 'image')} in {decoded.seconds:.1f} s: {n / max(decoded.seconds, 1e-9):,.0f} "
             f"images/s with {_plural(decoded.threads, 'thread')}")
        if isinstance(layout, Aspect):
            resized = sum(k for (w, h), k in decoded.sizes.items() if min(w, h) > self.max_size)
            size = self._nominal(decoded.sizes)
        else:
            resized = sum(k for s, k in decoded.sizes.items() if s != (layout[2], layout[1]))
            size = layout[1:]
            if len(decoded.sizes) > 1:
                common = ", ".join(f"{_fmt_size(s)} ({k:,})" for s, k in decoded.sizes.most_common(3))
                more = ", ..." if len(decoded.sizes) > 3 else ""
                _say(f"warning: images come in {len(decoded.sizes)} sizes ({common}{more}); "
                     f"all resized to {layout[2]}x{layout[1]} (shorter side, then centre crop)")
        self._check_classes(listing, decoded.labels)
        mean, std = decoded.moments.mean_std()
        details = {**self._details(listing, decoded.failed, decoded.sizes), "resized": resized,
                   "decode_s": decoded.seconds, "decode_images_per_s": n / max(decoded.seconds, 1e-9),
                   "threads": decoded.threads}
        return ImageSet(self.name, decoded.images[0], decoded.labels[0], decoded.images[1], decoded.labels[1],
                        listing.classes, mean, std, details,
                        input_size=tuple(size) if isinstance(layout, Aspect) else None)

    def _layout(self, sizes: Counter[tuple[int, int]], all_gray: bool) -> Layout:
        if self.layout == "aspect":
            return Aspect(1 if all_gray else 3, self.max_size)
        return cache_layout(sizes, all_gray, self.max_size)

    def _image_bytes(self, layout: Layout, sizes: Counter[tuple[int, int]]) -> float | None:
        """Mean bytes of a decoded image of the aspect layout, from a sample of sizes (None: square)."""
        if not isinstance(layout, Aspect):
            return None
        count = sum(sizes.values())
        stored = sum(k * math.prod(aspect_size(*s, self.max_size)) for s, k in sizes.items())
        return layout.channels * (stored / count if count else self.max_size ** 2)

    def _nominal(self, sizes: Counter[tuple[int, int]]) -> tuple[int, int]:
        """The square the aspect and files layouts are cropped to by default: the most common shorter
        side, capped at ``max_size`` (as ``cache_layout`` picks the square cache's side)."""
        _, h, w = cache_layout(sizes, False, self.max_size) if len(sizes) != 1 else \
            (0, *(min(self.max_size, min(next(iter(sizes)))),) * 2)
        return h, w

    def _details(self, listing: Listing, failed: list[tuple[str, str]],
                 sizes: Counter[tuple[int, int]]) -> dict[str, Any]:
        aspects = [max(w, h) / min(w, h) for w, h in sizes] or [1.0]
        return {"skipped": len(failed),
                "skipped_files": [printable(os.path.relpath(p, listing.root)) for p, _ in failed[:20]],
                "test_from": listing.test_from, "layout": self.layout,
                "shorter_side": [min(min(s) for s in sizes), max(min(s) for s in sizes)] if sizes else None,
                "max_aspect": max(aspects),
                "options": {"max_size": self.max_size, "holdout_frac": self.holdout_frac, "layout": self.layout}}

    def _index_into(self, listing: Listing, directory: Path, workers: int) -> ImageSet:
        """The files layout: check every file's header (in threads), keep the list of those that are
        images, and take the mean and std from a spread of ``STATS_SAMPLE`` training images."""
        start = time.perf_counter()
        tasks = _chunks(listing, None, max(8, min(1024, math.ceil((len(listing.train) + len(listing.test))
                                                                   / (4 * workers)))))
        kept: list[list[tuple[str, int]]] = [[], []]
        failed: list[tuple[str, str]] = []
        sizes: Counter[tuple[int, int]] = Counter()
        all_gray = True
        splits = (listing.train, listing.test)
        results = _results(tasks, min(workers, len(tasks)), _check_chunk)
        try:
            with (bar := _progress_bar("checking", self.progress)):
                task = bar.add_task("check", total=sum(map(len, splits)))
                for c in results:
                    kept[c.split] += [splits[c.split][c.start + i] for i in c.kept]
                    failed += c.failed
                    sizes += c.sizes
                    all_gray &= c.all_gray
                    bar.advance(task, len(c.kept) + len(c.failed))
        finally:
            results.close()
        self._check_failures(listing, failed)
        channels = 1 if all_gray else 3
        labels = tuple(np.array([y for _, y in files], np.int64) for files in kept)
        self._check_classes(listing, labels)
        images = tuple(FileImages(listing.root, tuple(os.path.relpath(f, listing.root) for f, _ in files),
                                  self.max_size, channels) for files in kept)
        sample = images[0].read(np.unique(np.linspace(0, len(images[0]) - 1, STATS_SAMPLE).round().astype(int)))
        moments = ChannelMoments(channels)
        moments.add(RaggedImages.from_list([x for x in sample if x is not None]))
        mean, std = moments.mean_std()
        for name, files, y in zip(("train", "test"), images, labels):
            (directory / f"{name}_files.bin").write_bytes(b"\0".join(map(os.fsencode, files.files)))
            np.save(directory / f"{name}_labels.npy", y)
        seconds = time.perf_counter() - start
        n = sum(map(len, labels))
        _say(f"checked {_plural(n, 'image file')} in {seconds:.1f} s; they are decoded as training reads them "
             f"(mean and std from {_plural(min(STATS_SAMPLE, len(images[0])), 'training image')})")
        details = {**self._details(listing, failed, sizes), "check_s": seconds,
                   "stats_from": min(STATS_SAMPLE, len(images[0]))}
        return ImageSet(self.name, images[0], labels[0], images[1], labels[1], listing.classes, mean, std, details,
                        input_size=self._nominal(sizes))

    def _check_failures(self, listing: Listing, failed: list[tuple[str, str]]) -> None:
        if not failed:
            return
        named = ", ".join(f"{printable(os.path.relpath(p, listing.root))} ({why})"
                          for p, why in failed[:_NAMED_FAILURES])
        more = ", ..." if len(failed) > _NAMED_FAILURES else ""
        total = len(listing.train) + len(listing.test)
        if self.strict:
            raise DataError(f"{listing.root}: {len(failed):,} of {_plural(total, 'file')} cannot be decoded: "
                            f"{named}{more} (remove them, or prepare without --strict to skip them)")
        _say(f"warning: skipped {len(failed):,} of {_plural(total, 'file')} that cannot be decoded: {named}{more}")

    def _check_classes(self, listing: Listing, labels: tuple[np.ndarray, np.ndarray]) -> None:
        counts = np.bincount(labels[0], minlength=len(listing.classes))
        lost = [c for c, k in zip(listing.classes, counts) if k == 0]
        if lost:
            raise DataError(f"{listing.root / 'train'}: no decodable image in class folder"
                            f"{'s' if len(lost) > 1 else ''} {', '.join(lost)}")
        if len(labels[1]) == 0:
            raise DataError(f"{listing.root}: no decodable test image (from {listing.test_from})")


def imagefolder_name(path: Path) -> str:
    return archive_stem(path) if is_archive(path) else (path.resolve().name or "imagefolder")


class FileImages:
    """Image files decoded as they are read: the files layout, for sets too large to cache.

    Each read gives the aspect layout's array (upright, shorter side capped at ``max_size``, aspect
    kept; JPEGs decoded at libjpeg's reduced scales), so the crop loaders treat it as ``RaggedImages``.
    A file that fails to decode while training is skipped and named once on stderr, never raised.
    """

    nbytes = 0  # nothing held in memory

    def __init__(self, root: Path, files: Sequence[str], max_size: int, channels: int) -> None:
        self.root, self.files, self.max_size, self.channels = Path(root), tuple(files), max_size, channels
        self.failed: dict[str, str] = {}  # file -> why, for files that failed while training
        self._layout = Aspect(channels, max_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        """Image ``i`` decoded, (C, h, w) uint8; raises what Pillow raises for a bad file."""
        return decode_image(os.path.join(self.root, self.files[i]), self._layout)[0]

    def _get(self, i: int) -> np.ndarray | None:
        try:
            return self[i]
        except Exception as e:
            name = self.files[i]
            if name not in self.failed:
                self.failed[name] = _reason(e)
                _say(f"warning: skipped {printable(name)} ({self.failed[name]}): it cannot be decoded")
            return None

    def subset(self, rows: Sequence[int] | np.ndarray) -> FileImages:
        """Files ``rows``, in that order (a hold-out split)."""
        return FileImages(self.root, [self.files[int(i)] for i in rows], self.max_size, self.channels)

    def read(self, rows: Sequence[int], pool: ThreadPoolExecutor | None = None) -> list[np.ndarray | None]:
        """Images ``rows`` decoded (in ``pool``'s threads when given); None for a file that failed."""
        rows = [int(i) for i in rows]
        return list(pool.map(self._get, rows)) if pool is not None else [self._get(i) for i in rows]

    @classmethod
    def load(cls, directory: Path, split: str, root: Path, max_size: int, channels: int) -> FileImages:
        """The ``split`` files listed in a prepared cache."""
        raw = (directory / f"{split}_files.bin").read_bytes()
        return cls(root, [os.fsdecode(b) for b in raw.split(b"\0")] if raw else [], max_size, channels)
