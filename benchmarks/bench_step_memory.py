"""The training step's own memory: peak RSS growth over 5 steps of a recipe's model, with no dataset loaded.

    .venv/bin/python benchmarks/bench_step_memory.py [--recipe fashion-mnist] [--runs 3]

Each run is a fresh process: build the recipe's model and optimizer, one random batch of the recipe's
size, reset Linux's VmHWM to the current RSS, run 5 training steps (forward, loss, backward, step) and
report VmHWM minus the RSS before them: activations, gradients, optimizer state and allocator slack —
what `bench_data.py`'s training-memory growth holds besides the uint8 set. Linux only.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

CHILD = """
import re, sys, torch
from speedrun.recipes import get_recipe
from speedrun.models import build_model
from speedrun.techniques.optimizers import build_optimizer
from speedrun.techniques.label_smoothing import smoothed_cross_entropy

def rss(field):
    return int(re.search(rf"{field}:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

r = get_recipe(sys.argv[1])
channels, size = (1, 28) if "mnist" in r.data.source else (3, 32)
fmt = torch.channels_last if r.train.channels_last else torch.contiguous_format
m = build_model(r.model, in_channels=channels, num_classes=10, image_size=(size, size)).to(memory_format=fmt)
opt = build_optimizer(m, r)
x = torch.randn(r.train.batch_size, channels, size, size).contiguous(memory_format=fmt)
y = torch.randint(0, 10, (r.train.batch_size,))
before = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
for _ in range(5):
    loss = smoothed_cross_entropy(m(x), y, r.train.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
print(rss("VmHWM") - before)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    growth = [float(subprocess.run([sys.executable, "-c", CHILD, args.recipe], capture_output=True, text=True,
                                   check=True).stdout.split()[-1]) for _ in range(args.runs)]
    print(f"{args.recipe}: the training step's own peak RSS growth, {args.runs} fresh processes: median "
          f"{statistics.median(growth):.0f} MB (min {min(growth):.0f}, max {max(growth):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
