"""MFU of a recipe's training step: model FLOPs per step ÷ step time ÷ the matmul peak measured around it.

    .venv/bin/python benchmarks/bench_mfu.py [--recipe fashion-mnist] [--set K=V ...] [--data PATH] [--rounds 8] [--steps 20] [--write]

The step is `speedrun.fit`'s: forward under the recipe's autocast, label-smoothed loss, zero_grad,
backward, optimizer step -- on the recipe's own model (data-dependent init included), optimizer and one
augmented batch from its training loader, repeated. Not timed: data loading, the LR schedule,
evaluation (`bench_train.py` reports the MFU of whole runs, which include them).

Each round measures the 2048² matmul peak in the run's precision (best of 5, as `speedrun train` does) just before and
just after ``--steps`` steps; the round's MFU divides by the higher of the two, so a machine that slows
down mid-round is not credited with it. Then one more pass times the step's phases (forward + loss,
backward, optimizer) and a torch.profiler pass splits the step's operator time by kind.

A recipe that freezes parameters mid-run (``model.stem_train_frac`` in (0, 1), ``model.block_train_fracs``)
has a step per stretch between the freezes: each round times every one, and the run's MFU weighs them by
their share of the schedule (FLOPs and time alike); the phases and the profile are of the step most of
the run takes.

Last, each convolution's kernels are timed alone (``--kernel-rounds`` rounds, each between two peak
measurements): the forward, the input gradient and the weight gradient, on the layer's own input
shape, dtype and memory format -- the ones the (frozen) step runs. They say which kernels hold MFU down.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

from speedrun import data as datalib
from speedrun.argtypes import parse_sets
from speedrun.config import ConfigError
from speedrun.env import environment
from speedrun.measure.flops import measure_matmul_peak, precision_dtype, train_flops_per_image
from speedrun.recipes import get_recipe
from speedrun.techniques.freezing import frozen
from speedrun.env import resolve_precision
from speedrun.train.run import build_parts, resolve_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import write_section  # noqa: E402

# Operator kinds for the profile, by the first matching substring of the aten op's name.
KINDS = (("convolution_backward", "conv backward"), ("convolution", "conv forward"),
         ("mm", "matmul (optimizer, head)"), ("pool", "max-pool"), ("batch_norm", "batch norm"),
         ("relu", "activation"), ("threshold", "activation"), ("gelu", "activation"),
         ("fill_", "fill / zero"), ("zero_", "fill / zero"))


def kind_of(name: str) -> str:
    return next((kind for key, kind in KINDS if key in name), "other")


def conv_kernels(model: torch.nn.Module, x: torch.Tensor, context, autocast, rounds: int,
                 dev: torch.device, dtype: torch.dtype) -> list[dict]:
    """Each conv's forward, input-gradient and weight-gradient kernel timed alone, as the step in
    ``context`` runs it (a gradient the step does not compute is None), against the peak around it."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    seen = []
    handles = [m.register_forward_hook(lambda m, args, out: seen.append((m, args[0].detach(), args[0].requires_grad,
                                                                           out.detach())))
               for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with context(), autocast():
        model(x)
    for h in handles:
        h.remove()

    def median_s(fn, n: int = 10) -> float:
        fn()
        times = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    layers = []
    for conv, inp, input_grad, out in seen:
        inp, weight = inp.to(out.dtype), conv.weight.detach().to(out.dtype)  # autocast's dtype, if any
        grad = torch.randn_like(out)

        def kernel(mask, conv=conv, inp=inp, weight=weight, grad=grad):
            return lambda: torch.ops.aten.convolution_backward(
                grad, inp, weight, None, conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups, mask)
        with context():
            trains_weight = conv.weight.requires_grad
        kernels = {"forward": lambda conv=conv, inp=inp, weight=weight: torch.nn.functional.conv2d(
                       inp, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups),
                   "input grad": kernel([True, False, False]) if input_grad else None,
                   "weight grad": kernel([False, True, False]) if trains_weight else None}
        flops = 2 * out.numel() * weight[0].numel()
        layers.append(dict(name=f"{conv.in_channels}→{conv.out_channels} at {inp.size(-2)}×{inp.size(-1)} px",
                           flops=flops, kernels=kernels, seconds={k: [] for k, f in kernels.items() if f}, peaks=[]))
    for _ in range(rounds):
        before = measure_matmul_peak(dev, dtype)
        for layer in layers:
            for name, fn in layer["kernels"].items():
                if fn:
                    layer["seconds"][name].append(median_s(fn))
        peak = max(before, measure_matmul_peak(dev, dtype))
        for layer in layers:
            layer["peaks"].append(peak)
    return layers


def kernel_table(layers: list[dict]) -> str:
    """The kernels' table: median ms, GFLOP/s and % of the peak around each round, over the rounds."""
    names = ("forward", "input grad", "weight grad")
    lines = ["| conv (batch as the step's) | GFLOP per call | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    total = dict.fromkeys(names, 0.0)
    for layer in layers:
        cells = []
        for name in names:
            secs = layer["seconds"].get(name)
            if not secs:
                cells.append("— (not in the step)")
                continue
            ms = statistics.median(secs) * 1e3
            total[name] += ms
            share = statistics.median(layer["flops"] / s / p for s, p in zip(secs, layer["peaks"]))
            cells.append(f"{ms:.2f} ms, {layer['flops'] / (ms / 1e3) / 1e9:.0f} GFLOP/s, {share:.0%}")
        lines.append(f"| {layer['name']} | {layer['flops'] / 1e9:.3f} | " + " | ".join(cells) + " |")
    lines.append("| all convs | | " + " | ".join(f"{total[n]:.1f} ms" for n in names) + " |")
    return "\n".join(lines)


def step_variants(recipe, model) -> list[tuple[str, float, object]]:
    """The steps a run takes, as (name, share of the schedule, a context that freezes what is frozen
    then): one, or one per stretch between the freezes of stem- and layer-freezing."""
    points = ([(recipe.model.stem_train_frac, "stem", model.stem_parameters())]
              if 0 < recipe.model.stem_train_frac < 1 else [])
    if recipe.model.block_train_fracs:
        points += [(f, f"block {i + 1}", block) for i, (f, block)
                   in enumerate(zip(recipe.model.block_train_fracs, model.block_parameters())) if f < 1]
    if not points:
        return [("step", 1.0, contextlib.nullcontext)]
    points.sort(key=lambda p: p[0])
    variants = [("all training", points[0][0], contextlib.nullcontext)]
    for i, (start, _, _) in enumerate(points):
        end = points[i + 1][0] if i + 1 < len(points) else 1.0
        params = [p for _, _, ps in points[:i + 1] for p in ps]
        variants.append((" + ".join(name for _, name, _ in points[:i + 1]) + " frozen", end - start,
                         functools.partial(frozen, params)))
    return [v for v in variants if v[1] > 0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="fashion-mnist")
    parser.add_argument("--data", help="dataset: a built-in name or a path (default: the recipe's)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--kernel-rounds", type=int, default=5,
                        help="rounds of the per-conv kernel timings (0: skip them)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, as `speedrun train --set` does (repeatable)")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()

    try:
        recipe = get_recipe(args.recipe).override(parse_sets(args.set))
    except ConfigError as e:
        sys.exit(f"bench_mfu: {e}")
    dev = resolve_device("auto")
    precision = resolve_precision(recipe.train.precision, dev)
    dtype = precision_dtype(precision)  # every peak is measured in the run's precision
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    try:
        prepared = datalib.prepare(datalib.resolve(args.data or recipe.data.source))
    except datalib.DataError as e:
        sys.exit(f"bench_mfu: {e}")
    parts = build_parts(recipe, prepared.directory, dev, precision, seed=0)
    model, net, opt = parts.model, parts.net, parts.optimizer
    x, y = next(parts.train_loader.epoch(0))
    variants = step_variants(recipe, model)
    flops_per_image = {}
    for name, _, context in variants:
        with context(), parts.autocast():
            flops_per_image[name] = train_flops_per_image(model, x[:2], lambda out: parts.loss_fn(out, y[: len(out)]))
    env = environment(dev)
    print(f"{env['device_name']}, torch {env['torch_version']}, {env['threads']} threads, code {env['code_version']}; "
          + ", ".join(f"{name} {f / 1e6:.1f} MFLOP/image" for name, f in flops_per_image.items()) + f", batch {len(y)}")

    def step() -> None:
        with parts.autocast():
            loss = parts.loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for _, _, context in variants:
        with context():
            for _ in range(5):
                step()
    rows = {name: [] for name, _, _ in variants}
    rows_run = []  # the run's mix of the variants
    for i in range(args.rounds):
        before = measure_matmul_peak(dev, dtype)
        seconds = {}
        for name, _, context in variants:
            with context():
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync()
                seconds[name] = (time.perf_counter() - t0) / args.steps
        after = measure_matmul_peak(dev, dtype)
        peak = max(before, after)
        mixes = [(name, seconds[name], flops_per_image[name] * len(y)) for name in seconds]
        if len(variants) > 1:
            mixes.append(("run", sum(share * seconds[n] for n, share, _ in variants),
                          sum(share * flops_per_image[n] * len(y) for n, share, _ in variants)))
        for name, sec, step_flops in mixes:
            r = dict(ms=sec * 1e3, gflops=step_flops / sec / 1e9, peak=peak / 1e9, mfu=step_flops / sec / peak)
            (rows_run if name == "run" else rows[name]).append(r)
            print(f"  round {i} {name}: {r['ms']:.1f} ms/step, {r['gflops']:.1f} GFLOP/s, peak {before / 1e9:.0f}/"
                  f"{after / 1e9:.0f} GFLOP/s, MFU {r['mfu']:.1%}", flush=True)
    if rows_run:
        rows[f"run ({' + '.join(f'{share:.0%}' for _, share, _ in variants)})"] = rows_run
    profiled = max(variants, key=lambda v: v[1])  # the step most of the run takes
    phases = {"forward + loss": [], "backward": [], "optimizer": []}
    with profiled[2]():
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
    layers = conv_kernels(model, x, profiled[2], parts.autocast, args.kernel_rounds, dev, dtype) \
        if args.kernel_rounds > 0 else []
    conv_ms = sum(statistics.median(secs) * 1e3 for layer in layers for secs in layer["seconds"].values())
    step_ms = statistics.median(r["ms"] for r in rows[profiled[0]])

    def spread(values: list[float], fmt: str) -> str:
        return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    headline = list(rows)[-1]  # the run's mix, or the only step
    mfus = [r["mfu"] for r in rows[headline]]
    lines = [
        "| step | rounds | ms/step | achieved GFLOP/s | peak around it (GFLOP/s) | MFU |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {len(rs)} × {args.steps} steps | {spread([r['ms'] for r in rs], '{:.1f}')} | "
          f"{spread([r['gflops'] for r in rs], '{:.1f}')} | {spread([r['peak'] for r in rs], '{:.0f}')} | "
          f"{spread([100 * r['mfu'] for r in rs], '{:.0f}%')} |" for name, rs in rows.items()),
        "",
        f"**Step MFU{'' if len(variants) == 1 else ', the run' + chr(39) + 's mix'}: median "
        f"{statistics.median(mfus):.0%}** (min {min(mfus):.0%}, max {max(mfus):.0%}); "
        + ", ".join(f"{name} {f / 1e6:.1f} MFLOP" for name, f in flops_per_image.items())
        + f" per image forward+backward, batch {len(y)}, precision {precision}.",
        "",
        f"Phases of a step{'' if len(variants) == 1 else ' (' + profiled[0] + ')'} (median ms of {args.steps} steps): "
        + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in phases.items()) + ".",
        f"Operator time by kind (torch.profiler, self CPU time, {args.steps} steps): "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + ".",
    ]
    if layers:  # --kernel-rounds 0 skips them
        lines += [
            "",
            f"Convolution kernels of the step{'' if len(variants) == 1 else ' (' + profiled[0] + ')'}, each timed alone "
            f"on its layer's input (median of 10 calls, median over {args.kernel_rounds} rounds; % of the peak around "
            f"each round):",
            "",
            kernel_table(layers),
            "",
            f"Together {conv_ms:.1f} ms, {conv_ms / step_ms:.0%} of the step's median {step_ms:.1f} ms.",
        ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        sets = "".join(f" --set {item}" for item in args.set)
        write_section(f"mfu:{args.recipe}{sets}", f"Step MFU: `{args.recipe}`{sets}",
                      f"benchmarks/bench_mfu.py --recipe {args.recipe}{sets} --rounds {args.rounds} --steps {args.steps} "
                      f"--kernel-rounds {args.kernel_rounds}", env,
                      "Timed: the training step as `speedrun.fit` runs it (forward under the recipe's autocast, loss, "
                      "zero_grad, backward, optimizer step) on the recipe's model and optimizer and one augmented batch "
                      "of its loader, after 5 warm-up steps; no data loading, LR schedule or evaluation. MFU = model "
                      "FLOPs per step ÷ step time ÷ the higher of the 2048² matmul peaks in the run's precision "
                      f"({precision}) measured just before and just after the round.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
