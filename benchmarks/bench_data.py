"""Benchmark the input pipeline: loader time against training-step time, and peak memory against the data.

    .venv/bin/python benchmarks/bench_data.py [--repeats 5] [--steps 100] [--device auto] [--write]

Part 1, per built-in recipe and per loader (resident, stream): the training loader that `speedrun
train` builds (`build_loaders`), at the recipe's batch size but with the default recipe's augmentation,
is timed alone over one full epoch (normalization and augmentation included, device synchronized at
the end); then the recipe's model, optimizer and precision are timed on the first `--steps` of those
very batches held in a list (forward, backward, optimizer step; 3 warm-up steps first), and on the
same steps pulling the batches from the loader, which is the loader's real cost once the stream
loader's read-ahead overlaps the step. Reported: loader time as a % of step time (issue 3 goal: at
most 5%), and the in-loop overhead; median, min and max over `--repeats` runs.
Part 2, per loader: a fresh process trains the default recipe for `--memory-epochs` epochs (one
evaluation at the end) and reports its peak resident set (ru_maxrss, and the growth of Linux's VmHWM
over a warmed-up baseline) next to the uint8 dataset size and the budget 1.5 x dataset + the model's
parameters, gradients and optimizer state.
With --write the results replace the matching section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure the checkout beside this script, whichever speedrun is installed
import speedrun  # noqa: E402
from speedrun import data as datalib  # noqa: E402
from speedrun.env import environment  # noqa: E402
from speedrun.models import build_model  # noqa: E402
from speedrun.recipes import RECIPES, get_recipe  # noqa: E402
from speedrun.techniques.label_smoothing import smoothed_cross_entropy  # noqa: E402
from speedrun.train.hooks import evaluate  # noqa: E402
from speedrun.techniques.optimizers import build_optimizer  # noqa: E402
from speedrun.env import resolve_precision  # noqa: E402
from speedrun.train.run import build_loaders, resolve_device  # noqa: E402

DEFAULT = "fashion-mnist"
KINDS = ("resident", "stream")
MB = 1 << 20
WARMUP_STEPS = 10


def loader_recipe(name: str, kind: str, source: str | None):
    """Recipe ``name`` with the default recipe's data section (its augmentation), the loader ``kind``."""
    recipe = get_recipe(name)
    data = replace(get_recipe(DEFAULT).data, source=source or recipe.data.source, loader=kind)
    return replace(recipe, data=data)


class Stepper:
    """One training step of a recipe's model, optimizer and precision; ``run(batches)`` times a sequence."""

    def __init__(self, recipe, images, dev: torch.device) -> None:
        torch.manual_seed(0)
        model = build_model(recipe.model, in_channels=images.channels, num_classes=images.num_classes,
                            image_size=images.image_size).to(dev)
        if recipe.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.optimizer = model.train(), build_optimizer(model, recipe)
        precision = resolve_precision(recipe.train.precision, dev)
        self.autocast = contextlib.nullcontext
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            self.autocast = functools.partial(torch.autocast, dev.type, dtype=dtype)
        self.scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
        self.smoothing, self.precision = recipe.train.label_smoothing, precision
        self.sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(self, x, y) -> None:
        with self.autocast():
            loss = smoothed_cross_entropy(self.model(x), y, self.smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def run(self, batches, steps: int) -> float:
        """Seconds for ``steps`` steps over ``batches`` (an iterable: a list or a loader's epoch)."""
        self.sync()
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(batches):
            if i == steps:
                break
            self.step(x, y)
        self.sync()
        return time.perf_counter() - t0


def time_epoch(loader, epoch: int, sync) -> tuple[float, int]:
    """Seconds and images for one full epoch of ``loader`` alone."""
    sync()
    t0, images = time.perf_counter(), 0
    for _, y in loader.epoch(epoch):
        images += len(y)
    sync()
    return time.perf_counter() - t0, images


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}–{max(values):{fmt}}]"


def throughput(names: list[str], dev: torch.device, steps: int, repeats: int, source: str | None) -> str:
    rows = []
    for name in names:
        for kind in KINDS:
            recipe = loader_recipe(name, kind, source)
            prepared = datalib.prepare(datalib.resolve(recipe.data.source))
            built = build_loaders(recipe, prepared.directory, dev, seed=0)
            images, loader, got = built.images, built.train, built.kind
            assert got == kind
            stepper = Stepper(recipe, images, dev)
            n = min(steps, len(loader))
            batches = [b for _, b in zip(range(n), loader.epoch(0))]  # the same batches, made beforehand
            stepper.run(batches[:3], 3)  # warm-up: kernels, allocator, optimizer state
            loader_ips, step_ips, share, overhead = [], [], [], []
            for r in range(repeats):
                seconds, count = time_epoch(loader, r + 1, stepper.sync)
                # A/B in alternating order, so machine drift hits both alike.
                if r % 2 == 0:
                    listed, pulled = stepper.run(batches, n), stepper.run(loader.epoch(r + 1), n)
                else:
                    pulled, listed = stepper.run(loader.epoch(r + 1), n), stepper.run(batches, n)
                per_batch_loader = seconds / len(loader)
                loader_ips.append(count / seconds)
                step_ips.append(n * recipe.train.batch_size / listed)
                share.append(100 * per_batch_loader / (listed / n))
                overhead.append(100 * (pulled / listed - 1))
                print(f"  {name:<14} {kind:<8} repeat {r}: loader {loader_ips[-1]:,.0f} img/s, step "
                      f"{step_ips[-1]:,.0f} img/s, loader {share[-1]:.1f}% of step, in-loop {overhead[-1]:+.1f}%",
                      flush=True)
            rows.append(f"| `{name}` | {kind} | {recipe.train.batch_size} | {stepper.precision} | "
                        f"{spread(loader_ips, ',.0f')} | {spread(step_ips, ',.0f')} | **{spread(share, '.1f')}** | "
                        f"{spread(overhead, '+.1f')} |")
            del loader, batches, images
    return "\n".join([
        "| recipe | loader | batch | precision | loader alone, img/s | train step, img/s | loader time, % of step "
        "| in-loop overhead, % |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def proc_status_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_child(kind: str, epochs: float, source: str | None, device: str) -> dict:
    """In a fresh process: peak RSS of a short training with loader ``kind``.

    ru_maxrss of a child starts at its parent's peak (the kernel carries the high-water mark across
    fork and exec), so the growth is measured with Linux's own high-water mark, VmHWM, reset to the
    current RSS (``5 > /proc/self/clear_refs``) after a warm-up: ``WARMUP_STEPS`` training steps and
    an evaluation (as the recipe evaluates) of its model on random batches of the set's shape. Library
    initialisation and the activations' allocator pools are then in the baseline, and the growth is
    what the data and the trained model's state add. (With one warm-up step glibc's malloc was still
    growing its pools, by 69 MB on a 2 MB set; with 10 steps and the evaluation, runs still differ by
    tens of MB, so small sets need several runs.)
    """
    dev = resolve_device(device)
    recipe = get_recipe(DEFAULT).override({"data.loader": kind, **({"data.source": source} if source else {})})
    prepared = datalib.prepare(datalib.resolve(recipe.data.source))  # one-time decode, before the baseline
    shapes = datalib.load_prepared(prepared.directory, mmap=True)
    warm = Stepper(recipe, shapes, dev)
    memory_format = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
    batch = lambda n: torch.randn((n, *shapes.train_images.shape[1:]), device=dev).contiguous(memory_format=memory_format)
    for _ in range(WARMUP_STEPS):
        labels = torch.randint(0, shapes.num_classes, (recipe.train.batch_size,), device=dev)
        warm.step(batch(recipe.train.batch_size), labels)
    test_batch = (batch(recipe.eval.batch_size), torch.zeros(recipe.eval.batch_size, dtype=torch.long, device=dev))
    evaluate(warm.model, SimpleNamespace(epoch=lambda e, b=test_batch: [b]), tta_flip=recipe.eval.tta_flip,
             autocast=warm.autocast)
    # The model's own state: parameters, gradients, and the optimizer's buffers after a step.
    tensors = [*warm.model.parameters(), *(p.grad for p in warm.model.parameters() if p.grad is not None),
               *(v for st in warm.optimizer.state.values() for v in st.values() if torch.is_tensor(v))]
    model_state = sum(t.numel() * t.element_size() for t in tensors)
    del warm, tensors, test_batch
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        baseline = proc_status_bytes("VmRSS")
    except OSError:
        baseline = None
    result = speedrun.train(recipe, budget=f"{epochs}ep", store=None, stop_at_target=False, device=device)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"kind": kind, "resolved": result.env.get("loader"), "outcome": result.outcome, "epochs": result.epochs,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "peak_rss": proc_status_bytes("VmHWM") if baseline is not None else None, "rss_before": baseline,
            "dataset": shapes.nbytes, "model_state": model_state,
            "cuda_peak": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None}


def memory(epochs: float, runs: int, source: str | None, device: str) -> str:
    rows = []
    for kind in KINDS:
        results = []
        for _ in range(runs):
            cmd = [sys.executable, __file__, "--memory-child", kind, "--memory-epochs", str(epochs), "--device", device]
            if source:
                cmd += ["--data", source]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"memory run ({kind}) failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {kind}: {results[-1]}", flush=True)
        r0 = results[0]
        budget = 1.5 * r0["dataset"] + r0["model_state"]
        maxrss = [r["ru_maxrss"] / MB for r in results]
        growth = [(r["peak_rss"] - r["rss_before"]) / MB for r in results if r["peak_rss"] is not None]
        cuda = [r["cuda_peak"] / MB for r in results if r["cuda_peak"] is not None]
        after = "-" if r0["rss_before"] is None else f"{r0['rss_before'] / MB:.0f}"
        within = "-" if not growth else f"**{'yes' if max(growth) <= budget / MB else 'no'}**"
        rows.append(f"| {kind} | {r0['dataset'] / MB:.1f} | {r0['model_state'] / MB:.2f} | {budget / MB:.1f} | "
                    f"{spread(maxrss, '.0f')} | {after} | "
                    f"{spread(growth, '.1f') if growth else '-'} | {within} | {spread(cuda, '.0f') if cuda else '-'} |")
    return "\n".join([
        "| loader | uint8 set, MB | model state, MB | budget 1.5 x set + state, MB | ru_maxrss, MB | "
        "RSS before training, MB | peak growth (VmHWM), MB | growth within budget | CUDA peak allocated, MB |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated built-in recipes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="training steps timed per repeat")
    parser.add_argument("--memory-epochs", type=float, default=1.0)
    parser.add_argument("--memory-runs", type=int, default=3)
    parser.add_argument("--data", default=None, help="dataset instead of the recipes' (smoke tests)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.memory_epochs, args.data, args.device)))
        return 0

    dev = resolve_device(args.device)
    env = environment(dev)
    where = (f"{env['device_name']} (CPU {env['cpu_model']}), {env['threads']} threads, torch {env['torch_version']}, "
             f"code {env['code_version']}")
    print(where)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    mem = ""
    if not args.skip_memory:  # first, while this process is small: a child's ru_maxrss starts at ours
        print(f"peak memory, {args.memory_runs} run(s) per loader:")
        mem = memory(args.memory_epochs, args.memory_runs, args.data, args.device)
        print(mem)
    print(f"loader against step, {args.repeats} repeats:")
    table = throughput(names, dev, args.steps, args.repeats, args.data)
    print(table)
    if args.write:
        from bench_train import replace_section  # benchmarks/ is on sys.path when run as a script

        data = args.data or "each recipe's dataset"
        body = (f"## Input pipeline: resident and streaming loaders\n\n"
                f"Measured {date.today()} with `benchmarks/bench_data.py {' '.join(sys.argv[1:])}` on {where}; "
                f"data: {data}.\n\n"
                f"### Loader time against the training step\n\n"
                f"Each recipe's training loader at its batch size with the default recipe's augmentation. *Loader "
                f"alone*: one full epoch, normalization and augmentation included. *Train step*: forward, backward "
                f"and optimizer step of the recipe's model and precision on {args.steps} of those batches held in a "
                f"list. *Loader time* = loader seconds per batch ÷ step seconds per batch (goal: at most 5%). "
                f"*In-loop overhead*: the same steps pulling batches from the loader, against the list. "
                f"Median [min–max] of {args.repeats} repeats, A/B order alternating.\n\n{table}\n")
        if mem:
            body += (f"\n### Peak memory during a short training\n\n"
                     f"`{DEFAULT}` for {args.memory_epochs:g} epoch(s) with one evaluation, each run in a fresh "
                     f"process ({args.memory_runs} per loader, median [min–max]). The budget is 1.5 x the uint8 set "
                     f"(train + test) plus the model's parameters, gradients and optimizer state. The growth is the peak "
                     f"RSS (Linux VmHWM) less the RSS before training, both taken after a warm-up ({WARMUP_STEPS} training "
                     f"steps and one evaluation of the model on random batches, then freed), so that library "
                     f"initialisation and the activations' allocator pools are outside it. ru_maxrss is whole-process "
                     f"and starts at the parent's peak (the kernel carries it across fork and exec), hence the "
                     f"reset high-water mark. Memory-mapped pages the stream loader has read count in RSS but are "
                     f"page cache the kernel can reclaim.\n\n{mem}\n")
        replace_section(ROOT / "BENCHMARKS.md", "data:loaders", body)
        print("BENCHMARKS.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
