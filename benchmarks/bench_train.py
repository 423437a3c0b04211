"""Benchmark `speedrun train`: time-to-accuracy over seeds, MFU, and the trainer's overhead.

    .venv/bin/python benchmarks/bench_train.py [--recipe fashion-mnist] [--seeds 5] [--target 0.93]
                                               [--set train.epochs=4 ...] [--write]

Part 1 runs the recipe to its target once per seed, exactly as `speedrun train` does (the clock
covers loading the prepared dataset, building the model, training and every evaluation; the
one-time IDX decode is outside it and reported apart). Around every seed, outside its clock, the
matmul peak in the run's precision is measured again, so each seed's MFU is also stated against the peak of that moment:
this shared machine's speed drifts by up to ~1.3x within an hour, and the peak `speedrun train` caches
once per machine does not follow it.
Part 2 measures the event loop's overhead: the same model, optimizer, LR schedule and batches,
trained for the same steps by `speedrun.train.fit` with the recipe's hooks and by a bare
forward/backward/step loop, alternated A/B so machine drift hits both; evaluation time excluded.
With --write the results replace the matching section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import speedrun
from speedrun import data as datalib
from speedrun.env import environment, resolve_precision
from speedrun.argtypes import target_fraction
from speedrun.console import percent
from speedrun.cli import parse_sets
from speedrun.measure.clock import Clock
from speedrun.measure.flops import measure_matmul_peak, precision_dtype
from speedrun.measure.stats import seed_stats
from speedrun.models import build_model
from speedrun.techniques.label_smoothing import smoothed_cross_entropy
from speedrun.techniques.normalization import apply_norm_options
from speedrun.techniques.schedules import LRSchedule, lr_factor
from speedrun.train.hooks import DivergenceGuard, Evaluator
from speedrun.train.loop import FitState, fit
from speedrun.techniques.optimizers import build_optimizer
from speedrun.train.run import resolve_recipe

ROOT = Path(__file__).resolve().parent.parent


def train_seed(recipe_name: str, seed: int, store: Path, data: str | None = None, target: float | None = None,
               overrides: dict | None = None):
    """One `speedrun train` run, as the CLI does it, with a progress line."""
    r = speedrun.train(recipe_name, data=data, seed=seed, store=store, target=target, overrides=overrides)
    print(f"  {recipe_name} seed {seed}: {r.outcome:<16} tta {r.time_to_accuracy_s or float('nan'):6.1f} s  "
          f"best {r.best_accuracy or 0:.2%}  epochs {r.epochs:.2f}  {r.images_per_s:,.0f} img/s  "
          f"MFU {r.mfu:.0%}", flush=True)
    return r


def peak_now(dtype: torch.dtype) -> float:
    """The matmul peak of this moment in ``dtype`` (best of 5, as `speedrun train` measures it once per machine)."""
    return measure_matmul_peak(torch.device("cpu"), dtype)


def time_to_accuracy(recipe_name: str, seeds: int, store: Path, data: str | None = None,
                     target: float | None = None, overrides: dict | None = None,
                     first_seed: int = 0) -> tuple[list, str]:
    """Every seed in turn, with the matmul peak measured before and after each (outside its clock)."""
    recipe = resolve_recipe(recipe_name).override(overrides or {})
    dtype = precision_dtype(resolve_precision(recipe.train.precision, torch.device("cpu")))
    results, peaks = [], [peak_now(dtype)]
    for seed in range(first_seed, first_seed + seeds):
        results.append(train_seed(recipe_name, seed, store, data, target, overrides))
        peaks.append(peak_now(dtype))
        print(f"    matmul peak before/after: {peaks[-2] / 1e9:.0f} / {peaks[-1] / 1e9:.0f} GFLOP/s", flush=True)
    # The higher of the two peaks around a seed: the conservative denominator for its MFU.
    return results, seed_table(results, [max(a, b) for a, b in zip(peaks, peaks[1:])])


def seed_table(results: list, local_peaks: list[float] | None = None) -> str:
    """Markdown: one row per seed, then median/min/max/CV, pass-rate, the MLPerf aggregate and MFU.

    ``local_peaks`` (one per seed): matmul peaks measured around each seed; MFU is then also given
    against them.
    """
    s = seed_stats([r.time_to_accuracy_s for r in results])
    r0 = results[0]
    fmt = lambda v: "-" if v is None else f"{v:.1f} s"
    local = local_peaks is not None
    rows = []
    for i, r in enumerate(results):
        row = (f"| {r.seed} | {r.outcome} | {fmt(r.time_to_accuracy_s)} | {r.best_accuracy or 0:.2%} | {r.epochs:.2f} | "
               f"{len(r.curve)} ({r.eval_time_s:.1f}) | {r.images_per_s:,.0f} | {r.mfu:.0%} |")
        if local:
            row += f" {local_peaks[i] / 1e9:.0f} | {r.flops_per_s / local_peaks[i]:.0%} |"
        rows.append(row)
    head = f"| seed | outcome | time-to-{percent(r0.target)} | best acc | epochs | evals (s) | train img/s | MFU |"
    rule = "|---|---|---|---|---|---|---|---|"
    if local:
        head, rule = head + " peak then (GFLOP/s) | MFU then |", rule + "---|---|"
    mfu = (f"MFU = achieved training FLOP/s ÷ the {r0.env['precision']} 2048² matmul peak `speedrun train` cached (its "
           f"best reading), {r0.peak_flops / 1e9:.1f} GFLOP/s (median MFU {statistics.median(r.mfu for r in results):.0%})")
    if local:
        mfu += (f"; *MFU then* divides by the peak measured just before and after each seed, the higher of the two "
                f"(median MFU then {statistics.median(r.flops_per_s / p for r, p in zip(results, local_peaks)):.0%})")
    lines = [
        head, rule, *rows,
        "",
        f"**{s.runs} seeds: pass-rate {s.pass_rate:.0%}; time-to-{percent(r0.target)} median {fmt(s.median_s)}, "
        f"min {fmt(s.min_s)}, max {fmt(s.max_s)}, CV {0 if s.cv is None else s.cv:.1%}; "
        f"MLPerf aggregate (drop fastest and slowest, mean of the rest) {fmt(s.mlperf_s)}.**",
        "",
        f"Model: {r0.flops_per_image / 1e6:.1f} MFLOP per image forward+backward. {mfu}. "
        f"One-time dataset preparation: {max(r.prepare_s for r in results):.1f} s (outside the clock).",
    ]
    return "\n".join(lines)


def bare_loop(model, opt, loss_fn, batches, schedule, steps: int, steps_per_epoch: int) -> float:
    """Seconds for ``steps`` plain forward/backward/step iterations with the LR schedule set inline."""
    model.train()
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        if step == steps:
            break
        factor = lr_factor(schedule, progress=step / steps, epoch=step / steps_per_epoch)
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * factor
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def overhead(recipe_name: str, steps: int, repeats: int) -> str:
    recipe = resolve_recipe(recipe_name)
    prepared = datalib.prepare(datalib.resolve(recipe.data.source))
    images = datalib.load_prepared(prepared.directory)
    loader = datalib.ResidentLoader(
        torch.as_tensor(images.train_images), torch.as_tensor(images.train_labels),
        batch_size=recipe.train.batch_size, mean=images.mean, std=images.std, train=True,
        flip=recipe.data.flip, translate_px=recipe.data.translate_px, channels_last=recipe.train.channels_last)
    steps = min(steps, len(loader))
    smoothing = recipe.train.label_smoothing
    loss_fn = lambda logits, y: smoothed_cross_entropy(logits, y, smoothing)

    def fresh():
        torch.manual_seed(0)
        model = build_model(recipe.model, in_channels=images.channels, num_classes=images.num_classes,
                            image_size=images.image_size)
        apply_norm_options(model, recipe.model)
        if recipe.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, build_optimizer(model, recipe)

    def bare() -> float:
        return bare_loop(*fresh(), loss_fn, loader.epoch(0), recipe.schedule, steps, len(loader))

    def framework() -> float:
        model, opt = fresh()
        clock = Clock().start()
        state = FitState(model=model, optimizer=opt, loss_fn=loss_fn, loader=loader, schedule_steps=steps,
                         max_steps=steps)
        evaluator = Evaluator(loader, clock=clock, target=None, every_steps=0, start_step=steps + 1)
        evaluator.run = lambda state: None  # no evaluation: we time the training steps only
        fit(state, [LRSchedule(recipe.schedule), DivergenceGuard(), evaluator])
        return clock.elapsed()

    bare()  # warm-up: oneDNN primitive creation, allocator
    pairs = []
    for i in range(repeats):
        a, b = (bare(), framework()) if i % 2 == 0 else tuple(reversed((framework(), bare())))
        pairs.append((a, b))
        print(f"  repeat {i}: bare {a:.2f} s, speedrun.fit {b:.2f} s, ratio {b / a:.3f}", flush=True)
    ratios = [b / a for a, b in pairs]
    med = statistics.median(ratios)
    return (f"{steps} training steps of `{recipe_name}` (batch {recipe.train.batch_size}), {repeats} A/B repeats "
            f"alternating order: bare loop median {statistics.median(a for a, _ in pairs):.2f} s, `speedrun.fit` "
            f"with LR schedule, divergence guard and evaluator hooks median "
            f"{statistics.median(b for _, b in pairs):.2f} s. **Overhead: median ratio {med:.3f} "
            f"({(med - 1) * 100:+.1f}%), min {min(ratios):.3f}, max {max(ratios):.3f}.**")


def hook_cost_per_step(steps: int = 2000, repeats: int = 5) -> tuple[float, float]:
    """Seconds per step that `fit` and its hooks add, measured where they dominate: a linear model on
    tiny random batches, so a step costs ~0.1 ms and the A/B difference is above timer noise."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(steps)]

    class Loader:
        def __len__(self):
            return steps

        def epoch(self, e):
            return iter(batches)

    recipe = resolve_recipe("fashion-mnist")
    loss_fn = torch.nn.functional.cross_entropy

    def fresh():
        model = torch.nn.Linear(16, 4)
        opt = torch.optim.SGD([{"params": model.parameters(), "peak_lr": 0.1}], lr=0.1, momentum=0.9)
        return model, opt

    def bare() -> float:
        return bare_loop(*fresh(), loss_fn, batches, recipe.schedule, steps, steps)

    def framework() -> float:
        model, opt = fresh()
        clock = Clock().start()
        state = FitState(model=model, optimizer=opt, loss_fn=loss_fn, loader=Loader(), schedule_steps=steps,
                         max_steps=steps)
        evaluator = Evaluator(None, clock=clock, target=None, every_steps=0, start_step=steps + 1)
        evaluator.run = lambda state: None
        fit(state, [LRSchedule(recipe.schedule), DivergenceGuard(), evaluator])
        return clock.elapsed()

    bare(), framework()  # warm-up
    diffs, bares = [], []
    for _ in range(repeats):
        a, b = bare(), framework()
        bares.append(a / steps)
        diffs.append((b - a) / steps)
    return statistics.median(diffs), statistics.median(bares)


def measured_with(command: str, env: dict) -> str:
    """The provenance sentence every written section opens with: date, command, machine, torch, code."""
    return (f"Measured {date.today()} with `{command}` on {env['device_name']}, {env['threads']} threads, "
            f"torch {env['torch_version']}, code {env['code_version']}.")


def write_section(section: str, heading: str, command: str, env: dict, text: str) -> None:
    """Replace BENCHMARKS.md's ``section`` with ``## heading``, the provenance sentence, then ``text``."""
    replace_section(ROOT / "BENCHMARKS.md", section, f"## {heading}\n\n{measured_with(command, env)} {text}")
    print("BENCHMARKS.md updated")


def replace_section(path: Path, title: str, body: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start_marker, end_marker = f"<!-- {title} -->", f"<!-- /{title} -->"
    block = f"{start_marker}\n{body}\n{end_marker}"
    if start_marker in text:
        head, rest = text.split(start_marker, 1)
        text = head + block + rest.split(end_marker, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds first-seed .. first-seed + seeds - 1 (fresh seeds: ones no choice was made on)")
    parser.add_argument("--data", help="dataset path (default: the recipe's data.source)")
    parser.add_argument("--target", type=target_fraction, help="accuracy target (default: the recipe's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, as `speedrun train --set` does (repeatable)")
    parser.add_argument("--overhead-steps", type=int, default=100)
    parser.add_argument("--overhead-repeats", type=int, default=5)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    env = environment(torch.device("cpu"))
    print(f"{env['device_name']}, torch {env['torch_version']}, {env['threads']} threads, code {env['code_version']}")
    with tempfile.TemporaryDirectory() as tmp:
        print(f"time-to-accuracy, {args.seeds} seeds:")
        _, tta = time_to_accuracy(args.recipe, args.seeds, Path(tmp) / "runs.sqlite", args.data, args.target,
                                  parse_sets(args.set), args.first_seed)
    print(tta)
    over = ""
    variant = bool(args.target or args.set)
    if not args.skip_overhead and not variant:
        print("trainer overhead:")
        over = overhead(args.recipe, args.overhead_steps, args.overhead_repeats)
        cost, bare_step = hook_cost_per_step()
        over += (f"\n\nHook cost where it dominates (a 16->4 linear model, batch 8, 2,000 steps, median of 5): "
                 f"`fit` + hooks add **{cost * 1e6:.0f} µs per step** over a bare loop ({bare_step * 1e6:.0f} µs/step)"
                 f" — i.e. the loop's own overhead on this recipe's steps is that figure divided by its step time.")
        print(over)
    if args.write:
        options = "".join([f" --first-seed {args.first_seed}" if args.first_seed else "",
                           f" --data {args.data}" if args.data else "",
                           f" --target {args.target:g}" if args.target else "",
                           *(f" --set {item}" for item in args.set)])
        title = f"`speedrun train --recipe {args.recipe}{options if variant else ''}`"
        section = f"train:{args.recipe}"
        if variant:  # a variant of the recipe gets a section of its own
            section += ":" + options.strip().replace(" ", "")
        body = (f"## {title}\n\n"
                + measured_with(f"benchmarks/bench_train.py --recipe {args.recipe} --seeds {args.seeds}{options}", env)
                + " Timed region: from before the prepared dataset is read to the end of "
                f"the first evaluation at or above target (model creation, training, every evaluation included).\n\n"
                f"{tta}\n" + (f"\n### Trainer overhead\n\n{over}\n" if over else ""))
        replace_section(ROOT / "BENCHMARKS.md", section, body)
        print("BENCHMARKS.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
