"""Benchmark process-wide step settings: the `retain-memory` technique (glibc keeps freed blocks).

    .venv/bin/python benchmarks/bench_step.py [--recipe fashion-mnist] [--pairs 5] [--steps 30] [--write]

The setting cannot be switched off inside a process, so each measurement is a fresh child
process: off and on alternate (off, on, off, on, ...) so machine drift hits both. Each child
builds the recipe's model (channels_last as the recipe says) and optimizer, runs 5 warm-up steps
on one random batch of the recipe's size and shape, then times `--steps` steps of forward,
label-smoothed loss, backward and SGD step; it reports ms/step and minor page faults per step.
No data loading, evaluation or LR schedule is inside the timed region.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from speedrun.env import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import write_section  # noqa: E402

CHILD = """
import json, resource, sys, time, torch
from speedrun.recipes import get_recipe
from speedrun.models import build_model
from speedrun.techniques.allocator import retain_freed_memory
from speedrun.techniques.label_smoothing import smoothed_cross_entropy
from speedrun.techniques.optimizers import build_optimizer

recipe, retain, steps = get_recipe(sys.argv[1]), sys.argv[2] == "on", int(sys.argv[3])
if retain:
    retain_freed_memory()
torch.manual_seed(0)
model = build_model(recipe.model, in_channels=1, num_classes=10, image_size=(28, 28))
fmt = torch.channels_last if recipe.train.channels_last else torch.contiguous_format
model = model.to(memory_format=fmt)
opt = build_optimizer(model, recipe)
x = torch.randn(recipe.train.batch_size, 1, 28, 28).contiguous(memory_format=fmt)
y = torch.randint(0, 10, (recipe.train.batch_size,))

def step():
    loss = smoothed_cross_entropy(model(x), y, recipe.train.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

for _ in range(5):
    step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"ms": (t1 - t0) / steps * 1e3, "faults": (r1.ru_minflt - r0.ru_minflt) / steps}))
"""


def measure(recipe: str, retain: bool, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, recipe, "on" if retain else "off", str(steps)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    env = environment(torch.device("cpu"))
    print(f"{env['device_name']}, torch {env['torch_version']}, {env['threads']} threads, code {env['code_version']}")
    runs: dict[bool, list[dict]] = {False: [], True: []}
    ratios = []
    for i in range(args.pairs):
        off, on = measure(args.recipe, False, args.steps), measure(args.recipe, True, args.steps)
        runs[False].append(off)
        runs[True].append(on)
        ratios.append(off["ms"] / on["ms"])
        print(f"  pair {i}: off {off['ms']:.1f} ms/step ({off['faults']:.0f} faults/step), "
              f"on {on['ms']:.1f} ms/step ({on['faults']:.0f} faults/step), speedup {ratios[-1]:.2f}x", flush=True)

    def row(name: str, rs: list[dict]) -> str:
        ms = [r["ms"] for r in rs]
        return (f"| {name} | {statistics.median(ms):.1f} | {min(ms):.1f} | {max(ms):.1f} | "
                f"{statistics.median(r['faults'] for r in rs):,.0f} |")

    table = "\n".join([
        "| retain-memory | ms/step median | min | max | minor faults/step (median) |",
        "|---|---|---|---|---|",
        row("off (glibc default)", runs[False]),
        row("on", runs[True]),
        "",
        f"**Speedup of the step, off/on per pair: median {statistics.median(ratios):.2f}x "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}), {args.pairs} pairs.**",
    ])
    print(table)
    if args.write:
        write_section(f"step:{args.recipe}", "Step settings: `retain-memory`",
                      f"benchmarks/bench_step.py --recipe {args.recipe} --pairs {args.pairs} --steps {args.steps}", env,
                      "Each measurement is a fresh process (the setting is process-wide), off and on alternating; "
                      f"timed: {args.steps} training steps (forward, loss, backward, SGD step) of the recipe's model on "
                      f"one random batch of its size, after 5 warm-up steps — no data loading or evaluation.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
