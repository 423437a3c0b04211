"""Benchmark ImageNet-class training on real photos: Imagewoof through the aspect cache, the crop loader,
decoding on the fly, FixRes, the recipe on a held-out split, and time-to-accuracy over seeds.

    .venv/bin/python benchmarks/bench_imagewoof.py PART [--archive PATH] [--write] [...]

Parts (each writes its own section of BENCHMARKS.md with --write):

  prepare   one-time preparation of the archive in each layout (square 128 px, aspect 160 px, files):
            seconds, images/s, bytes on disk and in memory, and loading the cache (what a run does
            inside its clock): read into memory, or memory-mapped and touched once.
  loader    the crop loader's throughput (training crops at 128 px, evaluation crops at 160 px) per way
            of making them (per image on 1 or 2 threads, batched matmuls; with or without a prefetch
            thread) and from files decoded on the fly, against the imagewoof model's training step.
  decode    JPEG decode rates per thread, for Imagewoof's files and for ImageNet-sized ones (Imagewoof
            images enlarged to 500x375, quality 90), and what ImageNet would need (printed; the
            figures for this machine and an 8-GPU node are in BENCHMARKS.md).
  dev       recipe candidates trained on 90% of the training set and scored on the held-out 10% (the
            validation images are not used): --candidates NAME[,NAME...] from CANDIDATES.
  fixres    one dev-split training, then its model evaluated at several test resolutions on the held-out 10%.
  train     the timed benchmark: `imagewoof` on the real split, --seeds runs of the whole schedule (or up to
            the recipe's target, --stop-at-target); time to 76.6% and 86.3% read from each run's evaluations
            (the run's own clock), and the best accuracy.

Timed parts must hold the bench lock on a quiet machine (uptime's load average under ~2.5):
    flock /work/wt/bench.lock .venv/bin/python benchmarks/bench_imagewoof.py train --seeds 3 --write
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure the checkout beside this script, whichever speedrun is installed
sys.path.insert(0, str(ROOT / "benchmarks"))
import speedrun  # noqa: E402
from speedrun import data as datalib  # noqa: E402
from speedrun.data.crops import CropLoader, resized_side  # noqa: E402
from speedrun.data.imagefolder import Aspect, ImageFolderSource, decode_image, holdout_split  # noqa: E402
from speedrun.env import environment  # noqa: E402
from speedrun.recipes import get_recipe  # noqa: E402
from speedrun.train.hooks import evaluate  # noqa: E402
from bench_train import write_section  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "imagewoof2-160.tar.gz"
LEADERBOARD = (0.766, 0.863)  # fast.ai's Imagewoof, 128 px: 5 epochs 76.6%, 20 epochs 86.3% (means of 5 runs)
# A cheaper proxy of a full run for screening candidates (dev --proxy): ResNet-18 at half its ImageNet widths,
# crops growing 72 -> 96 px, 4 epochs (~1/9 of the recipe's work; ~1/14 of the recipe as first set).
PROXY = {"model.widths": "32,64,128,256", "data.crop_size": 96, "eval.crop_size": 120, "train.epochs": 4}
HEADINGS = {
    "prepare": ("Imagewoof: the cache in each layout (one-time preparation; loading it)",
                "The archive was extracted beforehand (outside these times). Loading is what every run does "
                "inside its clock: reading the pixels into memory, or mapping the file and touching every page."),
    "loader": ("Imagewoof: crops from the aspect cache against the training step", ""),
    "decode": ("Imagewoof: decoding JPEGs on the fly", ""),
    "dev": ("Imagewoof: choosing the recipe on a held-out tenth of the training set",
            "Trained on 90% of Imagewoof's training images, scored on the other 10% (by name hash, "
            "`holdout_split`); the validation images are not used."),
    "dev-proxy": ("Imagewoof: screening recipe candidates on a cheaper proxy, on the held-out tenth",
                  f"Each candidate with the proxy's overrides {PROXY} (ResNet-18 at half its ImageNet widths, "
                  "crops growing 72 -> 96 px, 4 epochs), trained on 90% of Imagewoof's training images and "
                  "scored on the other 10%; the validation images are not used. A screen, not a result: what wins "
                  "here is then trained in full."),
    "fixres": ("Imagewoof: the test resolution (FixRes)", ""),
    "train": ("`speedrun train --recipe imagewoof`: time-to-accuracy over seeds",
              "Each seed trains the whole schedule (the clock as `speedrun train`'s: from before the cache is read, "
              "model creation, training and every evaluation included); time-to-76.6% and time-to-86.3% are the "
              "clock at the first evaluation at or above them (the leaderboard's 5- and 20-epoch entries at 128 px; "
              "validation top-1, no test-time augmentation)."),
}

# Recipe candidates for `dev`: overrides of `imagewoof`, compared on the held-out tenth of the training set.
# They override the recipe as it is now; the runs in BENCHMARKS.md overrode it as first set (SGD, full widths,
# crops growing to 128 px, 8 epochs: code 0ee0471), which is how `muon-half-112` became the recipe.
# On a loaded machine, or to screen many, compare them on a cheaper proxy (--proxy: PROXY above, for every run).
CANDIDATES: dict[str, dict[str, object]] = {
    "recipe": {},
    "lr1": {"optim.lr": 1.0},
    "lr4": {"optim.lr": 4.0},
    "wd5e-4": {"optim.weight_decay": 5e-4},
    "no-resize": {"data.resize_start_scale": 1.0},
    "scale08": {"data.rrc_scale": "0.08,1"},
    "scale05": {"data.rrc_scale": "0.5,1"},
    "adamw": {"optim.name": "adamw", "optim.lr": 3e-3, "optim.lr_batch_size": 64, "optim.weight_decay": 0.05},
    "muon": {"optim.name": "muon", "optim.muon_lr": 0.1, "optim.muon_momentum": 0.8},
    "muon-lr0.2": {"optim.name": "muon", "optim.muon_lr": 0.2, "optim.muon_momentum": 0.8},
    "muon-m0.9": {"optim.name": "muon", "optim.muon_lr": 0.1, "optim.muon_momentum": 0.9},
    # Muon at half the widths and 112 px crops: ~3.5x the images/s of the recipe's net, so ~26 epochs in its hour.
    "muon-half-112": {"optim.name": "muon", "optim.muon_lr": 0.2, "optim.muon_momentum": 0.8,
                      "model.widths": "32,64,128,256", "data.crop_size": 112, "eval.crop_size": 144,
                      "train.epochs": 26},
    "cosine": {"schedule.kind": "cosine", "schedule.warmup_frac": 0.1},
    "half-width": {"model.widths": "32,64,128,256"},
    "short": {"train.epochs": 5},
    "lookahead": {"average.kind": "lookahead"},
    "ema": {"average.kind": "ema", "average.decay": 0.99},
}


def say(text: str) -> None:
    print(text, flush=True)


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min)"


@contextmanager
def fresh_home():
    """A temporary SPEEDRUN_HOME: nothing cached, nothing left behind."""
    old = os.environ.get("SPEEDRUN_HOME")
    with tempfile.TemporaryDirectory(prefix="bench-woof-") as tmp:
        os.environ["SPEEDRUN_HOME"] = tmp
        try:
            yield Path(tmp)
        finally:
            if old is None:
                os.environ.pop("SPEEDRUN_HOME", None)
            else:
                os.environ["SPEEDRUN_HOME"] = old


def extracted(archive: Path) -> Path:
    """The archive's tree, extracted once into the cache (speedrun's own extraction)."""
    return ImageFolderSource(archive).root()


def dev_tree(archive: Path, frac: float = 0.1) -> Path:
    """A tree of links: train/ = 90% of each class's training images, val/ = the other 10% (chosen by
    name hash, as speedrun's holdout_split), so recipes are chosen without the validation images."""
    from speedrun import paths

    root = extracted(archive)
    digest = hashlib.sha256(f"{root}:{frac}".encode()).hexdigest()[:12]
    tree = paths.cache_dir() / "dev-splits" / f"{root.name}-{digest}"  # not beside the extracted tree
    if (tree / ".done").is_file():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    for cls in sorted(p.name for p in (root / "train").iterdir()):
        files = sorted(str(p) for p in (root / "train" / cls).iterdir())
        for split, chosen in zip(("train", "val"), holdout_split(files, frac)):
            (tree / split / cls).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (tree / split / cls / Path(f).name).symlink_to(f)
    (tree / ".done").touch()
    return tree


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------- prepare

def part_prepare(args) -> str:
    rows = []
    with fresh_home():
        root = extracted(args.archive)  # extraction: once, outside the comparisons
        for layout, max_size in (("square", 128), ("aspect", 160), ("files", 160)):
            source = datalib.resolve(str(root), layout=layout, max_size=max_size)
            prepared = datalib.prepare(source)
            size = du(prepared.directory)
            t0 = time.perf_counter()
            data = datalib.load_prepared(prepared.directory)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            mapped = datalib.load_prepared(prepared.directory, mmap=True)
            touched = _touch(mapped)
            map_s = time.perf_counter() - t0
            n = len(data.train_labels) + len(data.test_labels)
            mapped_cell = f"{map_s:.2f} ({touched / 2**20:,.0f} MiB)" if touched else f"{map_s:.2f} (no pixels)"
            rows.append(f"| {layout} | {max_size} | {prepared.prepare_s:.1f} | {n / prepared.prepare_s:,.0f} | "
                        f"{size / 2**20:,.0f} MiB | {data.nbytes / 2**20:,.0f} MiB | {load_s:.2f} | {mapped_cell} |")
            say(rows[-1])
            shutil.rmtree(prepared.directory)
    return "\n".join([
        "| layout | max size (px) | prepare (s) | images/s | on disk | pixels in memory | read into memory (s) "
        "| memory-mapped, every page touched (s) |",
        "|---|---|---|---|---|---|---|---|", *rows])


def _touch(data) -> int:
    """Read one byte per page of a mapped set (a first epoch's page faults); the bytes mapped."""
    total = 0
    for images in (data.train_images, data.test_images):
        buffer = images if isinstance(images, np.ndarray) else getattr(images, "data", None)  # files: none
        if isinstance(buffer, np.ndarray):
            flat = buffer.reshape(-1)
            int(flat[::4096].sum())
            total += flat.nbytes
    return total


# ---------------------------------------------------------------- loader

def _aspect_set(archive: Path, max_size: int = 160):
    prepared = datalib.prepare(datalib.resolve(str(extracted(archive)), layout="aspect", max_size=max_size))
    return prepared, datalib.load_prepared(prepared.directory, mmap=True)


def _loader_rate(loader: CropLoader, batches: int, epoch: int = 0) -> float:
    """Images/s of ``batches`` batches of one epoch, the first (warm-up) excluded."""
    it = loader.epoch(epoch)
    next(it)
    t0, n = time.perf_counter(), 0
    for _, (x, y) in zip(range(batches), it):
        n += len(y)
    return n / (time.perf_counter() - t0)


class _Stepper:
    """Training steps of the recipe's model (channels_last, fp32, its optimizer and label smoothing)."""

    def __init__(self, recipe, size: int) -> None:
        from speedrun.models import build_model
        from speedrun.techniques.optimizers import build_optimizer

        torch.manual_seed(0)
        model = build_model(recipe.model, in_channels=3, num_classes=10, image_size=(size, size))
        self.model = model.to(memory_format=torch.channels_last).train()
        self.opt, self.size, self.batch = build_optimizer(self.model, recipe), size, recipe.train.batch_size

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from speedrun.techniques.label_smoothing import smoothed_cross_entropy

        loss = smoothed_cross_entropy(self.model(x), y, 0.1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def rate(self, batches, steps: int) -> float:
        """Images/s of ``steps`` steps over ``batches`` (a list, or a loader's epoch: its time included),
        after one warm-up step."""
        it = iter(batches)
        self.step(*next(it))
        t0, n = time.perf_counter(), 0
        for _, (x, y) in zip(range(steps), it):
            self.step(x, y)
            n += len(y)
        return n / (time.perf_counter() - t0)


def _step_rate(recipe, size: int, steps: int) -> float:
    """Training images/s of the recipe's model at ``size`` px on random batches."""
    stepper = _Stepper(recipe, size)
    x = torch.randn(stepper.batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (stepper.batch,))
    return stepper.rate([(x, y)] * (steps + 1), steps)


def part_loader(args) -> str:
    recipe = get_recipe("imagewoof")
    _, data = _aspect_set(args.archive)
    ram = data.train_images.to("cpu")
    common = dict(mean=data.mean, std=data.std, channels_last=True, seed=0)
    train = dict(train=True, flip=True, rrc_scale=(0.35, 1.0), batch_size=recipe.train.batch_size, **common)
    ways = [("per image, 1 thread", dict(workers=1)), ("per image, 2 threads", dict(workers=2)),
            ("per image, 2 threads, prefetch thread", dict(workers=2, prefetch=2)),
            ("batched matmuls (a device's way)", dict(workers=1, batched=True))]
    stepper = _Stepper(recipe, 128)
    made = CropLoader(ram, data.train_labels, size=128, workers=2, **train)
    listed = [b for _, b in zip(range(args.steps + 1), made.epoch(0))]
    step = stepper.rate(listed, args.steps)
    say(f"imagewoof training step at 128 px: {step:.1f} images/s")
    loop = []
    for name, prefetch in (("made when asked for", 0), ("made by a prefetch thread, 2 ahead", 2)):
        loader = CropLoader(ram, data.train_labels, size=128, workers=2, prefetch=prefetch, **train)
        rate = stepper.rate(loader.epoch(1), args.steps)
        loop.append(f"| {name} | {rate:.1f} | {step / rate - 1:+.1%} |")
        say(loop[-1])
    rows = []
    for name, options in ways:
        rate = _loader_rate(CropLoader(ram, data.train_labels, size=128, **train, **options), args.batches)
        rows.append(f"| training crops, 128 px, batch {recipe.train.batch_size} | {name} | {rate:,.0f} | "
                    f"{step / rate:.1%} |")
        say(rows[-1])
    test = CropLoader(data.test_images.to("cpu"), data.test_labels, size=160, crop_frac=1.0, train=False,
                      batch_size=256, workers=2, **common)
    rows.append(f"| evaluation crops, 160 px, batch 256 | per image, 2 threads | "
                f"{_loader_rate(test, min(args.batches, 14)):,.0f} | - |")
    say(rows[-1])
    files = datalib.load_prepared(datalib.prepare(datalib.resolve(
        str(extracted(args.archive)), layout="files", max_size=160)).directory)
    for workers in (1, 2):
        rate = _loader_rate(CropLoader(files.train_images, files.train_labels, size=128, workers=workers,
                                       prefetch=4, **train), args.batches)
        rows.append(f"| training crops from files decoded on the fly | {workers} decode thread(s), prefetch "
                    f"thread | {rate:,.0f} | {step / rate:.1%} |")
        say(rows[-1])
    return "\n".join([f"Training step of `imagewoof`'s ResNet-18 at 128 px, batch {recipe.train.batch_size}, fp32, "
                      f"channels_last: **{step:.1f} images/s** over {args.steps} steps on batches made beforehand. "
                      "The same steps pulling training crops (per image, 2 threads) from the loader:", "",
                      "| crops | images/s in the loop | step time added |", "|---|---|---|", *loop, "",
                      "Loaders alone (no training):", "",
                      "| batches | made by | images/s | loader time / step time |", "|---|---|---|---|", *rows])


# ---------------------------------------------------------------- decode

def _decode_rate(files: list[str], layout, threads: int) -> tuple[float, float]:
    """(images per second of wall clock, images per CPU-second of this process). The second is what
    one core decodes when it is not shared: on a loaded machine the wall clock is not."""
    from concurrent.futures import ThreadPoolExecutor

    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda f: decode_image(f, layout), files))
    return len(files) / (time.perf_counter() - t0), len(files) / (time.process_time() - c0)


def part_decode(args) -> str:
    from PIL import Image

    root = extracted(args.archive)
    woof = sorted(str(p) for p in (root / "train").glob("*/*"))[::9][:600]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        big = []
        for i, f in enumerate(woof[:300]):  # ImageNet-sized: 500x375, quality 90 (ImageNet's are ~110 KB)
            with Image.open(f) as img:
                path = Path(tmp) / f"{i}.jpg"
                img.convert("RGB").resize((500, 375), Image.Resampling.BICUBIC).save(path, quality=90)
                big.append(str(path))
        kb = statistics.mean(os.path.getsize(f) for f in big) / 1024
        woof_kb = statistics.mean(os.path.getsize(f) for f in woof) / 1024
        for label, files, layout in (
                (f"Imagewoof 160 px files ({woof_kb:.0f} KB), to a 160 px shorter side", woof, Aspect(3, 160)),
                (f"500x375 JPEGs ({kb:.0f} KB), to a 256 px shorter side", big, Aspect(3, 256)),
                (f"500x375 JPEGs ({kb:.0f} KB), to a 160 px shorter side (libjpeg at 1/2)", big, Aspect(3, 160))):
            (one, per_cpu), (two, _) = (_decode_rate(files, layout, t) for t in (1, 2))
            rows.append(f"| {label} | {one:,.0f} | {two:,.0f} | {per_cpu:,.0f} |")
            say(rows[-1])
    return "\n".join(["| files | 1 thread (images/s) | 2 threads (images/s) | per CPU-second, 1 thread |",
                      "|---|---|---|---|", *rows])


# ---------------------------------------------------------------- dev and fixres

def _dev_run(tree: Path, overrides: dict, seed: int = 0, **kw):
    return speedrun.train("imagewoof", data=tree, seed=seed, store=None, stop_at_target=False,
                          overrides={**overrides, **kw.pop("extra", {})}, **kw)


def part_dev(args) -> str:
    tree = dev_tree(args.archive)
    rows = []
    for name in args.candidates.split(","):
        overrides = {**(PROXY if args.proxy else {}), **CANDIDATES[name], **dict(args.set)}
        say(f"{name}: {overrides} ({load_line()})")
        r = _dev_run(tree, overrides, seed=args.seed, budget=args.budget)
        if args.save:
            r.save(Path(args.save) / f"{name}-seed{args.seed}.pt")
        curve = " ".join(f"{p.epoch:.1f}:{p.accuracy:.1%}" for p in r.curve)
        rows.append(f"| {name} | `{overrides}` | {r.best_accuracy:.2%} | {r.epochs:.2f} | {r.total_time_s:,.0f} | "
                    f"{r.images_per_s:.1f} | {curve} |")
        say(rows[-1])
    return "\n".join(["| candidate | overrides of `imagewoof` | best held-out acc | epochs | clock (s) | "
                      "train img/s | evaluations (epoch: accuracy) |", "|---|---|---|---|---|---|---|", *rows])


def part_fixres(args) -> str:
    from speedrun.config import from_dict

    tree = dev_tree(args.archive)
    if args.model:  # a model `dev --save` kept
        classifier = speedrun.load(args.model)
        model, recipe, what = classifier.net, from_dict(classifier.recipe), f"`{Path(args.model).name}`"
    else:
        r = _dev_run(tree, dict(args.set), seed=args.seed, budget=args.budget)
        model, recipe, what = r.model, r.recipe, f"`imagewoof` {dict(args.set) or ''}"
        say(f"trained: {r.epochs:.2f} epochs, held-out {r.final_accuracy:.2%}")
    train_size = recipe.data.crop_size
    data = datalib.load_prepared(datalib.prepare(datalib.resolve(str(tree), layout="aspect", max_size=160)).directory)
    images = data.test_images.to("cpu")
    rows = []
    tests = [(train_size, 0.875)] + [(8 * round(train_size * k / 8), 1.0) for k in (1, 1.125, 1.25, 1.375, 1.5)]
    tests += [(8 * round(train_size * 1.25 / 8), 0.875)]
    for size, frac in sorted(tests):
        loader = CropLoader(images, data.test_labels, size=size, crop_frac=frac, train=False, batch_size=128,
                            mean=data.mean, std=data.std, channels_last=True, workers=2)
        acc, loss = evaluate(model, loader)
        rows.append(f"| {size} | {frac:g} | {resized_side(size, frac)} | {acc:.2%} | {loss:.3f} |")
        say(rows[-1])
    return "\n".join([f"One training of {what} on the 90% split ({recipe.train.epochs:g} epochs, crops growing to "
                      f"{train_size} px), evaluated on the held-out 10% ({len(data.test_labels)} images):",
                      "", "| test size (px) | crop_frac | resized shorter side | held-out top-1 | loss |",
                      "|---|---|---|---|---|", *rows])


# ---------------------------------------------------------------- the timed benchmark

def first_at(curve, target: float) -> tuple[float, float] | None:
    """(seconds, epoch) of the first evaluation at or above ``target``, from a run's curve."""
    return next(((p.elapsed_s, p.epoch) for p in curve if p.accuracy >= target), None)


def part_train(args) -> str:
    rows, hits = [], {t: [] for t in LEADERBOARD}
    for seed in range(args.seed, args.seed + args.seeds):
        before = load_line()
        r = speedrun.train("imagewoof", data=args.archive, seed=seed, store=args.store,
                           stop_at_target=args.stop_at_target,
                           budget=args.budget, overrides=dict(args.set))
        cells = []
        for t in LEADERBOARD:
            hit = first_at(r.curve, t)
            hits[t].append(hit)
            cells.append("-" if hit is None else f"{hit[0] / 60:.1f} min (epoch {hit[1]:.1f})")
        curve = " ".join(f"{p.epoch:.1f}:{p.accuracy:.1%}" for p in r.curve)
        rows.append(f"| {seed} | {' | '.join(cells)} | {r.best_accuracy:.2%} | {r.total_time_s / 60:.1f} min | "
                    f"{r.epochs:.2f} | {r.images_per_s:.1f} | {r.mfu:.0%} | {before}; after {load_line()} | {curve} |")
        say(rows[-1])
    summary = []
    for t in LEADERBOARD:
        times = [h[0] for h in hits[t] if h]
        passed = f"{len(times)}/{args.seeds} seeds reached {t:.1%}"
        summary.append(passed + (f", median {statistics.median(times) / 60:.1f} min" if len(times) == args.seeds
                                 else ""))
    return "\n".join([
        "| seed | time-to-76.6% | time-to-86.3% | best top-1 | clock | epochs | train img/s | MFU | machine load | "
        "evaluations (epoch: accuracy) |", "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "**" + "; ".join(summary) + ".**"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("prepare", "loader", "decode", "dev", "fixres", "train"))
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="dev, fixres: the seed; train: the first of --seeds seeds")
    parser.add_argument("--budget", help="dev, fixres, train: a time or epoch budget per run (e.g. 60m, 3ep)")
    parser.add_argument("--candidates", default="recipe", help=f"dev: from {', '.join(CANDIDATES)}")
    parser.add_argument("--proxy", action="store_true", help=f"dev: every run on the cheaper PROXY {PROXY}")
    parser.add_argument("--set", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
                        metavar="KEY=VALUE", help="an override of the recipe, for every run (repeatable)")
    parser.add_argument("--batches", type=int, default=20, help="loader: batches timed per way")
    parser.add_argument("--steps", type=int, default=5, help="loader: training steps timed")
    parser.add_argument("--stop-at-target", action="store_true",
                        help="train: stop each run at the recipe's target, as `speedrun train` does (no 86.3%%)")
    parser.add_argument("--store", default=None, help="train: a run store to record the runs in")
    parser.add_argument("--save", help="dev: a folder to save each candidate's trained model in")
    parser.add_argument("--model", help="fixres: a model saved by dev --save (else one is trained)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if not args.archive.is_file():
        print(f"bench_imagewoof: the Imagewoof archive is absent ({args.archive}); give --archive PATH")
        return 2
    env = environment(torch.device("cpu"))
    say(f"{env['device_name']}, torch {env['torch_version']}, {env['threads']} threads, code {env['code_version']}; "
        f"{load_line()}")
    before = load_line()
    text = globals()[f"part_{args.part}"](args)
    after = load_line()
    say(text)
    if args.write:
        extra = "".join(f" --{k} {getattr(args, k)}" for k in ("seed", "seeds", "budget", "candidates")
                        if getattr(args, k) is not None and k in {"train": ("seed", "seeds", "budget"),
                                                                   "dev": ("budget", "candidates"),
                                                                   "fixres": ("budget",)}.get(args.part, ()))
        extra += " --proxy" * args.proxy + " --stop-at-target" * args.stop_at_target
        extra += "".join(f" --set {k}={v}" for k, v in args.set)
        part = args.part + "-proxy" * args.proxy
        heading, intro = HEADINGS[part]
        write_section(f"imagewoof:{part}", heading, f"benchmarks/bench_imagewoof.py {args.part}{extra}", env,
                      f"Machine {before} before, {after} after (a 2-core machine: above ~2.5 other work shared "
                      f"it, and times are not valid benchmark figures). {intro}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
