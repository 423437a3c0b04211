"""MFU of a recipe's training step: model FLOPs per step ÷ step time ÷ the matmul peak measured around it.

    .venv/bin/python benchmarks/bench_mfu.py [--recipe fashion-mnist] [--rounds 8] [--steps 20] [--write]

The step is `speedrun.fit`'s: forward under the recipe's autocast, label-smoothed loss, zero_grad,
backward, optimizer step -- on the recipe's own model (data-dependent init included), optimizer and one
augmented batch from its training loader, repeated. Not timed: data loading, the LR schedule,
evaluation (`bench_train.py` reports the MFU of whole runs, which include them).

Each round measures the fp32 2048² matmul peak (best of 5, as `speedrun train` does) just before and
just after ``--steps`` steps; the round's MFU divides by the higher of the two, so a machine that slows
down mid-round is not credited with it. Then one more pass times the step's phases (forward + loss,
backward, optimizer) and a torch.profiler pass splits the step's operator time by kind.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from speedrun import data as datalib
from speedrun.env import environment
from speedrun.measure.flops import measure_matmul_peak, train_flops_per_image
from speedrun.recipes import get_recipe
from speedrun.train.run import build_parts, resolve_device, resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import write_section  # noqa: E402

# Operator kinds for the profile, by the first matching substring of the aten op's name.
KINDS = (("convolution_backward", "conv backward"), ("convolution", "conv forward"),
         ("mm", "matmul (optimizer, head)"), ("pool", "max-pool"), ("batch_norm", "batch norm"),
         ("relu", "activation"), ("threshold", "activation"), ("gelu", "activation"),
         ("fill_", "fill / zero"), ("zero_", "fill / zero"))


def kind_of(name: str) -> str:
    return next((kind for key, kind in KINDS if key in name), "other")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    recipe = get_recipe(args.recipe)
    dev = resolve_device("auto")
    precision = resolve_precision(recipe.train.precision, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    prepared = datalib.prepare(datalib.resolve(recipe.data.source))
    parts = build_parts(recipe, prepared.directory, dev, precision, seed=0)
    model, net, opt = parts.model, parts.net, parts.optimizer
    x, y = next(parts.train_loader.epoch(0))
    with parts.autocast():
        flops_per_image = train_flops_per_image(model, x[:2], lambda out: parts.loss_fn(out, y[: len(out)]))
    step_flops = flops_per_image * len(y)
    env = environment(dev)
    print(f"{env['device_name']}, torch {env['torch_version']}, {env['threads']} threads, code {env['code_version']}; "
          f"{flops_per_image / 1e6:.1f} MFLOP/image, batch {len(y)}")

    def step() -> None:
        with parts.autocast():
            loss = parts.loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _ in range(5):
        step()
    rounds = []
    for i in range(args.rounds):
        before = measure_matmul_peak(dev)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        seconds = (time.perf_counter() - t0) / args.steps
        after = measure_matmul_peak(dev)
        peak = max(before, after)
        rounds.append(dict(ms=seconds * 1e3, gflops=step_flops / seconds / 1e9, peak=peak / 1e9,
                           mfu=step_flops / seconds / peak))
        r = rounds[-1]
        print(f"  round {i}: {r['ms']:.1f} ms/step, {r['gflops']:.1f} GFLOP/s, peak {before / 1e9:.0f}/"
              f"{after / 1e9:.0f} GFLOP/s, MFU {r['mfu']:.1%}", flush=True)

    phases = {"forward + loss": [], "backward": [], "optimizer": []}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with parts.autocast():
            loss = parts.loss_fn(net(x), y)
        sync()
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        sync()
        t3 = time.perf_counter()
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[name].append(dt * 1e3)
    with torch.profiler.profile() as prof:
        for _ in range(args.steps):
            step()
    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            kinds[kind_of(event.key)] = kinds.get(kind_of(event.key), 0.0) + event.self_cpu_time_total
    total = sum(kinds.values())

    def spread(values: list[float], fmt: str) -> str:
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    med = {k: statistics.median(r[k] for r in rounds) for k in ("ms", "mfu")}
    lines = [
        "| rounds | ms/step | achieved GFLOP/s | peak around it (GFLOP/s) | MFU |",
        "|---|---|---|---|---|",
        f"| {len(rounds)} × {args.steps} steps | {spread([r['ms'] for r in rounds], '{:.1f}')} | "
        f"{spread([r['gflops'] for r in rounds], '{:.1f}')} | {spread([r['peak'] for r in rounds], '{:.0f}')} | "
        f"{spread([100 * r['mfu'] for r in rounds], '{:.0f}%')} |",
        "",
        f"**Step MFU: median {med['mfu']:.0%}** (min {min(r['mfu'] for r in rounds):.0%}, "
        f"max {max(r['mfu'] for r in rounds):.0%}); {flops_per_image / 1e6:.1f} MFLOP per image forward+backward, "
        f"batch {len(y)}, precision {precision}.",
        "",
        "Phases of a step (median ms of " + str(args.steps) + " steps): "
        + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in phases.items()) + ".",
        "Operator time by kind (torch.profiler, self CPU time, " + str(args.steps) + " steps): "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + ".",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(f"mfu:{args.recipe}", f"Step MFU: `{args.recipe}`",
                      f"benchmarks/bench_mfu.py --recipe {args.recipe} --rounds {args.rounds} --steps {args.steps}", env,
                      "Timed: the training step as `speedrun.fit` runs it (forward under the recipe's autocast, loss, "
                      "zero_grad, backward, optimizer step) on the recipe's model and optimizer and one augmented batch "
                      "of its loader, after 5 warm-up steps; no data loading, LR schedule or evaluation. MFU = model "
                      "FLOPs per step ÷ step time ÷ the higher of the fp32 2048² matmul peaks measured just before and "
                      f"just after the round.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
