"""Benchmark training-step throughput of a recipe's model: fp32, bf16 autocast, torch.compile, compile + bf16.

    .venv/bin/python benchmarks/bench_precision.py [--recipe fashion-mnist] [--data PATH] [--repeats 7] [--steps 30] [--write]

What is timed: one training step of the recipe's model, optimizer and loss (forward under the
variant's autocast, label-smoothed cross-entropy, backward, optimizer step) on batches of the
recipe's size cut from the real training set beforehand, so data loading and augmentation are
excluded. Each variant gets a fresh model from the same seed. Its first step is timed alone: for
the compiled variants it includes the compilation of forward and backward, reported as compile
time (first step minus a steady step). Then ``--warmup`` untimed steps, then ``--repeats`` rounds
in which every variant runs ``--steps`` timed steps, the order rotating each round so machine drift
hits all alike; throughput is images/s per round, ratios are per round against fp32 in the same round.

Compilation starts cold: inductor's on-disk cache is pointed at a fresh temporary folder, as for a
first `speedrun train --set train.compile=true` on a machine (later runs reuse their cache and compile
faster). The second compiled variant may reuse kernels the first one built in this process.
With --write the result replaces the matching section of BENCHMARKS.md.
"""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

# Before torch is imported: a fresh, private inductor cache, so compile times are cold ones.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-precision-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from speedrun import data as datalib  # noqa: E402
from speedrun.env import compile_problem, cpu_has_native_bf16, environment  # noqa: E402
from speedrun.techniques.precision import autocast_for  # noqa: E402
from speedrun.train.run import build_parts, resolve_device, resolve_recipe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "compile": ("fp32", True),
            "compile+bf16": ("bf16", True)}


@dataclass
class Variant:
    name: str
    precision: str
    compiled: bool
    step: object = None  # () -> None: one training step on the next batch
    first_step_s: float = 0.0
    ips: list[float] = field(default_factory=list)  # images/s, one per round
    ratios: list[float] = field(default_factory=list)  # vs fp32 in the same round


def make_step(recipe, directory, dev, precision: str, compiled: bool, batches):
    """A closure running one training step per call, cycling through ``batches``."""
    parts = build_parts(recipe.override({"train.compile": compiled}), directory, dev, precision, seed=0)
    net, opt, loss_fn, autocast = parts.net, parts.optimizer, parts.loss_fn, autocast_for(precision, dev)
    net.train()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    i = 0

    def step() -> None:
        nonlocal i
        x, y = batches[i % len(batches)]
        i += 1
        with autocast():
            loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    return step


def timed(fn, n: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def fmt_ips(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--data", help="dataset path (default: the recipe's data.source)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant per round (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the first (default 5)")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "fp32" not in names:
        parser.error(f"--variants must include fp32 (the reference) and only {', '.join(VARIANTS)}; got {names}")
    if args.threads:
        torch.set_num_threads(args.threads)

    recipe = resolve_recipe(args.recipe)
    dev = resolve_device(args.device)
    env = environment(dev)
    directory = datalib.prepare(datalib.resolve(args.data or recipe.data.source,
                                                **datalib.source_options(recipe.data))).directory
    parts = build_parts(recipe, directory, dev, "fp32", seed=0)
    batches = [b for _, b in zip(range(8), parts.train_loader.epoch(0))]  # made once, outside the timing
    batch = recipe.train.batch_size
    steps_per_epoch = len(parts.train_loader)
    run_steps = math.ceil(recipe.train.epochs * steps_per_epoch)
    del parts
    print(f"{env['device_name']}, torch {env['torch_version']}, {env['threads']} threads, "
          f"cpu capability {env['cpu_capability']}, native bf16: {cpu_has_native_bf16()}, code {env['code_version']}")

    notes = []
    problem = compile_problem(dev)
    if problem and any(VARIANTS[n][1] for n in names):
        notes.append(f"**torch.compile does not work on this machine: {problem}.** Compiled variants skipped.")
        names = [n for n in names if not VARIANTS[n][1]]
    elif any(VARIANTS[n][1] for n in names):
        notes.append("torch.compile (TorchInductor, default mode) works on this machine; on a CPU it builds C++ "
                     "kernels with the system compiler, which is what the compile time pays for.")
    if dev.type == "cpu" and "bf16" in "".join(names) and not cpu_has_native_bf16():
        notes.append("This CPU has no native bf16 (no AVX-512 BF16 or AMX): bf16 matmuls and convs are emulated, "
                     "which is why `train.precision=auto` resolves to fp32 here.")

    variants = []
    for name in names:
        precision, compiled = VARIANTS[name]
        v = Variant(name, precision, compiled)
        v.step = make_step(recipe, directory, dev, precision, compiled, batches)
        print(f"  {name}: first step ...", end=" ", flush=True)
        v.first_step_s = timed(v.step)
        timed(v.step, args.warmup)
        print(f"{v.first_step_s:.1f} s", flush=True)
        variants.append(v)

    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            v.ips.append(args.steps * batch / timed(v.step, args.steps))
        ref = variants[0].ips[-1]  # fp32: names keep VARIANTS order, fp32 first
        for v in variants:
            v.ratios.append(v.ips[-1] / ref)
        print(f"  round {r}: " + ", ".join(f"{v.name} {v.ips[-1]:,.0f} img/s" for v in variants), flush=True)

    fp32 = variants[0]
    fp32_step = batch / statistics.median(fp32.ips)
    lines = [f"| variant | images/s median (min–max) | speed vs fp32, median of per-round ratios (min–max) | "
             f"first step | compile time | {run_steps} steps incl. compile | speed vs fp32 over the run |",
             "|---|---|---|---|---|---|---|"]
    for v in variants:
        step_s = batch / statistics.median(v.ips)
        compile_s = max(0.0, v.first_step_s - step_s) if v.compiled else 0.0
        run_s = run_steps * step_s + compile_s
        lines.append(f"| {v.name} | {fmt_ips(v.ips)} | {statistics.median(v.ratios):.2f}x "
                     f"({min(v.ratios):.2f}–{max(v.ratios):.2f}) | {v.first_step_s:.2f} s | "
                     + (f"{compile_s:.1f} s" if v.compiled else "-")
                     + f" | {run_s:.1f} s | {run_steps * fp32_step / run_s:.2f}x |")
        if v.compiled and step_s < fp32_step:
            notes.append(f"`{v.name}` pays its compile time back after {compile_s / (fp32_step - step_s):,.0f} "
                         f"steps ({compile_s / (fp32_step - step_s) / steps_per_epoch:.1f} epochs).")
        elif v.compiled:
            notes.append(f"`{v.name}` is no faster per step than fp32, so compiling never pays back here.")
    table = "\n".join(lines)
    print(table)
    print("\n".join(notes))

    if args.write:
        body = (
            f"## Precision and compilation: `{args.recipe}` training steps\n\n"
            f"Measured {date.today()} with `benchmarks/bench_precision.py --recipe {args.recipe} --repeats "
            f"{args.repeats} --steps {args.steps} --warmup {args.warmup}` on {env['device_name']}, "
            f"{env['threads']} threads, torch {env['torch_version']} (CPU capability {env['cpu_capability']}), "
            f"code {env['code_version']}.\n\n"
            f"Timed: training steps of the recipe's model (batch {batch}; forward under the variant's autocast, "
            f"loss, backward, optimizer step) on pre-made batches, data pipeline excluded; {args.repeats} rounds of "
            f"{args.steps} steps per variant, interleaved with the order rotating, after a first step (compilation, "
            f"cold inductor cache) and {args.warmup} warm-up steps. *{run_steps} steps incl. compile*: the recipe's "
            f"{recipe.train.epochs:g} epochs × {steps_per_epoch} steps at the median rate, plus compile time "
            f"(evaluation, which recompiles for eval mode under compile, not included).\n\n"
            f"{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
        replace_section(ROOT / "BENCHMARKS.md", f"precision:{args.recipe}", body)
        print("BENCHMARKS.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
