"""Benchmark data-parallel training (speedrun.train.distributed) on this machine, and the all-reduce it costs.

    flock /work/wt/bench.lock .venv/bin/python benchmarks/bench_ddp.py train [--runs 3] [--target 0.92]
    flock /work/wt/bench.lock .venv/bin/python benchmarks/bench_ddp.py allreduce [--repeats 30]

``train``: fashion-mnist to its target, ``speedrun train --nproc 2 --threads 1`` (2 processes x 1 thread,
gloo) against ``speedrun train --threads 2`` (1 process x 2 threads), ``--runs`` each, alternated so the
machine's drift hits both, seeds 0.. for both; each run's time-to-accuracy and training images/s as the
run reports them (the job's: rank 0's clock, every rank's images). Refuses to start when the 1-minute load
average is above 1.5 (a shared machine: the figures would be the other jobs', not this code's).

``allreduce``: the median time of one gloo all-reduce, 2 processes x 1 thread on this machine, of an fp32
tensor the size of each recipe's gradient (its trainable parameters): what DDP adds to a step at most
(it overlaps the all-reduce with the backward in 25 MB buckets, so less when the backward is longer).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"fashion-mnist": (1, 10, (28, 28)), "cifar10-94": (3, 10, (32, 32)),
           "imagenet-resnet50": (3, 1000, (224, 224))}


def load_1m() -> float:
    return os.getloadavg()[0]


def train_once(nproc: int, seed: int, target: float, store: Path) -> dict:
    threads = ["--threads", "1"] if nproc > 1 else ["--threads", "2"]
    command = [sys.executable, "-m", "speedrun", "train", "--recipe", "fashion-mnist", "--target", str(target),
               "--seed", str(seed), "--store", str(store), "--json", *threads]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise SystemExit(f"run failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def cmd_train(args: argparse.Namespace) -> None:
    if (load := load_1m()) > args.max_load:
        raise SystemExit(f"load average {load:.2f} > {args.max_load}: not a valid time on this shared machine; "
                         "run it when the machine is quiet")
    results: dict[str, list[dict]] = {"1x2": [], "2x1": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "runs.db"
        for seed in range(args.runs):
            for name, nproc in (("1x2", 1), ("2x1", 2)) if seed % 2 == 0 else (("2x1", 2), ("1x2", 1)):
                r = train_once(nproc, seed, args.target, store)
                results[name].append(r)
                print(f"{name} seed {seed}: {r['outcome']}, time-to-accuracy {r['time_to_accuracy_s']}, "
                      f"{r['images_per_s']:.0f} img/s, load {load_1m():.2f}", flush=True)
    print(f"\nload average after: {load_1m():.2f}")
    print("| layout | reached | time-to-accuracy median (min-max) s | train images/s median |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        tta = [r["time_to_accuracy_s"] for r in runs if r["time_to_accuracy_s"] is not None]
        ips = statistics.median(r["images_per_s"] for r in runs)
        span = f"{statistics.median(tta):.1f} ({min(tta):.1f}-{max(tta):.1f})" if tta else "-"
        label = "1 process x 2 threads" if name == "1x2" else "2 processes x 1 thread (gloo)"
        print(f"| {label} | {len(tta)}/{len(runs)} | {span} | {ips:,.0f} |")


def gradient_elements(recipe_name: str) -> int:
    from speedrun.models import build_model
    from speedrun.recipes import get_recipe

    channels, classes, size = RECIPES[recipe_name]
    model = build_model(get_recipe(recipe_name).model, in_channels=channels, num_classes=classes, image_size=size)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _allreduce_rank(rank: int, port: int, sizes: dict[str, int], repeats: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    times = {}
    for name, n in sizes.items():
        grad = torch.randn(n)
        for _ in range(3):  # warm-up: connections, buffers
            dist.all_reduce(grad)
        samples = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(grad)
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def cmd_allreduce(args: argparse.Namespace) -> None:
    import torch.multiprocessing as mp

    sizes = {name: gradient_elements(name) for name in RECIPES}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_before = load_1m()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        mp.spawn(_allreduce_rank, args=(port, sizes, args.repeats, str(out)), nprocs=2, join=True)
        times = json.loads(out.read_text())
    print(f"load average before {load_before:.2f}, after {load_1m():.2f}")
    print("| recipe | gradient (fp32) | gloo all-reduce, 2 x 1 thread, median | bus bandwidth |")
    print("|---|---|---|---|")
    for name, n in sizes.items():
        mb = n * 4 / 1e6
        # A ring all-reduce moves 2(p-1)/p of the buffer through each link: p=2, the buffer once.
        print(f"| {name} | {n:,} values, {mb:.1f} MB | {times[name] * 1e3:.2f} ms | {mb / 1e3 / times[name]:.2f} GB/s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    t = sub.add_parser("train")
    t.add_argument("--runs", type=int, default=3)
    t.add_argument("--target", type=float, default=0.92)
    t.add_argument("--max-load", type=float, default=1.5)
    t.set_defaults(func=cmd_train)
    a = sub.add_parser("allreduce")
    a.add_argument("--repeats", type=int, default=30)
    a.set_defaults(func=cmd_allreduce)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
