"""Benchmark checkpoints: what writing one costs a run (time and size), and reading one to resume.

    .venv/bin/python benchmarks/bench_checkpoint.py [--recipes fashion-mnist,cifar10-cpu] [--steps 12]
                                                    [--repeats 3] [--data cifar10-cpu=PATH ...] [--write]

Each repeat trains the recipe as `speedrun train` does, for ``--steps`` steps, with a checkpoint after
every step (``train.checkpoint_every_s`` set tiny) into a run store beside the default one (the same
disk); each write is timed as the trainer times it (state snapshot, serialization, temporary file,
fsync, rename, folder fsync: all inside the run's clock), and the last checkpoint is kept and read
back as ``speedrun train --resume`` reads it. The share of a run is the median write time over the
default interval (one write per ``checkpoint_every_s`` seconds of clock), and over the recipe's whole
run (``RUN_S``: its median time-to-accuracy in BENCHMARKS.md) with the writes it makes at the default.
With --write the results replace the checkpoint section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import speedrun
from speedrun import data as datalib
from speedrun.config import TrainConfig
from speedrun.env import environment
from speedrun.paths import home
from speedrun.recipes import get_recipe
from speedrun.store import RunStore
from speedrun.train import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import write_section  # noqa: E402

# Median time-to-accuracy of each recipe's whole run on this machine (BENCHMARKS.md's train sections).
RUN_S = {"fashion-mnist": 27.7, "cifar10-cpu": 395.8}


def timed_writes() -> tuple[list[float], Callable[[], None]]:
    """Wrap ``Checkpointer.write`` to record each write's duration; returns the list and an undo."""
    times: list[float] = []
    original = checkpoint.Checkpointer.write

    def write(self, state) -> None:
        start = time.perf_counter()
        original(self, state)
        times.append(time.perf_counter() - start)

    checkpoint.Checkpointer.write = write
    return times, lambda: setattr(checkpoint.Checkpointer, "write", original)


def measure(recipe_name: str, *, steps: int, repeats: int, data: str | None) -> dict:
    recipe = get_recipe(recipe_name)
    writes, reads, sizes, runs = [], [], [], []
    folder = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=home()))  # the default store's disk
    store = RunStore(folder / "runs.sqlite")
    prepared = datalib.prepare(datalib.resolve(data or recipe.data.source))
    steps_per_epoch = len(datalib.load_prepared(prepared.directory, mmap=True).train_labels) // recipe.train.batch_size
    epochs = (steps - 0.5) / steps_per_epoch  # a budget of ``steps`` steps
    for i in range(repeats):
        times, undo = timed_writes()
        try:
            r = speedrun.train(recipe_name, data=data, store=store, target=1.0, budget=f"{epochs:.6f}ep",
                               overrides={"train.checkpoint_every_s": 1e-9, "train.keep_checkpoint": True})
        finally:
            undo()
        path = store.checkpoint_path(r.run_id)
        start = time.perf_counter()
        checkpoint.read(path)
        reads.append(time.perf_counter() - start)
        sizes.append(path.stat().st_size)
        writes += times[1:]  # the first write of a process also pays one-time costs (imports, first fsync)
        runs.append(r)
        print(f"  {recipe_name} repeat {i + 1}: {r.steps} steps, {len(times)} writes, median "
              f"{statistics.median(times) * 1e3:.1f} ms (first {times[0] * 1e3:.1f} ms), "
              f"{sizes[-1] / 1e6:.2f} MB, read {reads[-1] * 1e3:.1f} ms", flush=True)
        checkpoint.remove(path)
    shutil.rmtree(folder)
    return {"recipe": recipe_name, "writes": writes, "reads": reads, "bytes": statistics.median(sizes),
            "params": sum(p.numel() for p in runs[0].model.parameters())}


def row(m: dict, every_s: float) -> str:
    w, rd = sorted(m["writes"]), sorted(m["reads"])
    med = statistics.median(w)
    run_s = RUN_S.get(m["recipe"])
    per_run = math.floor(run_s / every_s) if run_s else None
    share_run = f"{per_run} write(s): {per_run * med / run_s:.3%}" if run_s else "-"
    return (f"| `{m['recipe']}` | {m['params']:,} | {m['bytes'] / 1e6:.2f} MB | **{med * 1e3:.1f} ms** "
            f"[{w[0] * 1e3:.1f}–{w[-1] * 1e3:.1f}] (n={len(w)}) | {med / every_s:.3%} | {share_run} of {run_s:g} s | {statistics.median(rd) * 1e3:.1f} ms "
            f"[{rd[0] * 1e3:.1f}–{rd[-1] * 1e3:.1f}] |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="fashion-mnist,cifar10-cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", action="append", default=[], metavar="RECIPE=PATH",
                        help="dataset of a recipe (default: its data.source)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    data = dict(item.split("=", 1) for item in args.data)
    env = environment(torch.device("cpu"))
    print(f"{env['device_name']}, torch {env['torch_version']}, {env['threads']} threads, code {env['code_version']}")
    every_s = TrainConfig().checkpoint_every_s
    load_before = os.getloadavg()[0]
    results = [measure(name, steps=args.steps, repeats=args.repeats, data=data.get(name))
               for name in args.recipes.split(",")]
    table = "\n".join([
        "| recipe | parameters | checkpoint size | write time, median [min–max] "
        f"| share at the default interval ({every_s:g} s) | whole run at the default | read to resume, median [min–max] |",
        "|---|---|---|---|---|---|---|", *(row(m, every_s) for m in results)])
    load_after = os.getloadavg()[0]
    print(table)
    if args.write:
        options = "".join(f" --data {item}" for item in args.data)
        text = (f"Each of {args.repeats} repeats per recipe trains it as `speedrun train` does for {args.steps} "
                "steps, writing a checkpoint after every step into a run store on the default store's disk "
                "(ext4 on a virtual disk); a write is timed as the trainer times it, inside the run's clock: "
                "the state snapshot (model, optimizer, every hook's state, generators, loader position, curve), "
                "`torch.save` into memory, the temporary file written and fsynced, renamed over the previous "
                "checkpoint, the folder fsynced. The first write of each repeat is left out (one-time costs). "
                "Read: `torch.load(weights_only=True)` of the last checkpoint, as `--resume` reads it (its time "
                "is added to the resumed run's clock), from the page cache since it was just written. The share at the default interval is the median write "
                "over the interval; the whole run is the recipe's median time-to-accuracy (sections above) with "
                "the writes made in it at the default (one per interval of clock, none in a shorter run). "
                f"Other work shared the machine: load average {load_before:.1f} before, {load_after:.1f} after "
                "(2 cores): with 2 threads each, training steps ran several times slower than unloaded, so "
                "steps are not compared here; the writes are serialization and I/O, less slowed.\n\n" + table)
        write_section("checkpoint", "Checkpoints: cost of writing one, and of reading it to resume",
                      f"benchmarks/bench_checkpoint.py --recipes {args.recipes} --steps {args.steps} "
                      f"--repeats {args.repeats}{options}", env, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
