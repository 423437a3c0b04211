"""Benchmark the speedup of a recipe over the `baseline` control, both trained in the same run.

    .venv/bin/python benchmarks/bench_speedup.py [--recipe fashion-mnist] [--control baseline] [--seeds 5] [--write]

Each seed trains both recipes to the target, exactly as `speedrun train` does (the clock covers loading
the prepared dataset, building the model, training and every evaluation), alternating which goes
first so that drift of this shared machine's speed hits both alike. The speedup is the ratio of median
times-to-accuracy with a bootstrap 95% interval (the same estimator `speedrun ablate` uses); an
unreached run counts as infinitely slow, so a control that fails makes the speedup a lower bound.
With --write the result replaces the matching section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from bench_train import ROOT, replace_section, seed_table, train_seed
from speedrun.attribution import Sample, speedup
from speedrun.env import environment


def sample(results: list) -> Sample:
    return Sample.of([r.time_to_accuracy_s for r in results], ran_s=[r.total_time_s for r in results],
                     best_accuracy=[r.best_accuracy or 0.0 for r in results])  # None: never evaluated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--control", default="baseline")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    env = environment(torch.device("cpu"))
    print(f"{env['device_name']}, torch {env['torch_version']}, {env['threads']} threads, code {env['code_version']}")
    runs: dict[str, list] = {args.control: [], args.recipe: []}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "runs.sqlite"
        for seed in range(args.seeds):
            order = [args.control, args.recipe] if seed % 2 == 0 else [args.recipe, args.control]
            for name in order:
                runs[name].append(train_seed(name, seed, store))
    ratio = speedup(sample(runs[args.control]), sample(runs[args.recipe]))
    summary = (f"**Speedup of `{args.recipe}` over `{args.control}` (median time-to-accuracy ratio, bootstrap "
               f"95% interval over seeds): {ratio}.**")
    print(summary)
    if args.write:
        body = "\n\n".join([
            f"## Speedup: `{args.recipe}` vs `{args.control}`",
            f"Measured {date.today()} with `benchmarks/bench_speedup.py --recipe {args.recipe} --control "
            f"{args.control} --seeds {args.seeds}` on {env['device_name']}, {env['threads']} threads, torch "
            f"{env['torch_version']}, code {env['code_version']}. Both recipes trained seed by seed in one run, "
            f"alternating which went first. Timed region of each run: from before the prepared dataset is read "
            f"to the end of the first evaluation at or above target (model creation, training, every evaluation "
            f"included).",
            summary,
            f"### `{args.control}`", seed_table(runs[args.control]),
            f"### `{args.recipe}`", seed_table(runs[args.recipe]),
        ])
        replace_section(ROOT / "BENCHMARKS.md", f"speedup:{args.recipe}:{args.control}", body)
        print("BENCHMARKS.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
