"""Benchmark `speedrun tune` (issue 17): a timed tune of fashion-mnist against the built-in recipe, the
tuning overhead per trial, and trials per hour with 2 workers against 1.

    flock /work/wt/bench.lock .venv/bin/python benchmarks/bench_tune.py tune [--budget 30m] [--seeds 5] [--resume DIR]
    flock /work/wt/bench.lock .venv/bin/python benchmarks/bench_tune.py workers [--trials 4]
    flock /work/wt/bench.lock .venv/bin/python benchmarks/bench_tune.py overhead [--trials 100]

`tune` runs `speedrun tune --recipe fashion-mnist --time-budget BUDGET` (validation target 92%, a fresh
study in a temporary journal and run store), then trains the built-in recipe and the written TOML on
the test split, alternately, on fresh seeds 200.. (--seed0; never a search, confirmation or test seed), and
prints the medians and their ratio. `workers` times the search phase of two studies of the same
trials (random sampler, no pruning, an unreachable target so every trial runs its whole schedule):
one worker with every core, then 2 workers with a core each. Both print Markdown for BENCHMARKS.md,
with the load average before and after (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import speedrun
from speedrun.measure.stats import seed_stats
from speedrun.recipes import get_recipe
from speedrun.tune.study import tune

ROOT = Path(__file__).resolve().parent.parent


def load() -> str:
    return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())


def bench_tune(budget: str, seeds: int, workers: int, resume: Path | None = None, target: float | None = None,
               seed0: int = 200) -> None:
    work = resume or Path(tempfile.mkdtemp(prefix="bench-tune-"))
    store, journal, out = work / "runs.sqlite", work / "tune.journal", work / "best.toml"
    before = load()
    print(f"## tune: {budget}, {workers} worker(s); {before}", flush=True)
    start = time.time()
    # Resuming a finished search (--resume) runs no new trial (trials=1: the study already holds more).
    how = {"trials": 1} if resume else {"time_budget": budget}
    if target is not None:
        how["target"] = target
    result = tune("fashion-mnist", storage=str(journal), study="bench", store=str(store),
                  out=out, workers=workers, say=lambda line: print(line, flush=True), **how)
    tune_s = time.time() - start
    print(json.dumps(result.to_dict(), default=str), flush=True)
    print(f"tune took {tune_s / 60:.1f} min; {load()}", flush=True)
    if result.out is None:
        print("no recipe written: nothing to compare", flush=True)
        return
    times: dict[str, list] = {"fashion-mnist": [], str(out): []}
    test_target = get_recipe("fashion-mnist").target  # both judged at the built-in's test target
    print(f"built-in against tuned on the test split, to {test_target:.0%} (the TOML's own target is the "
          f"study's validation target, {result.target:.2%})", flush=True)
    for seed in range(seed0, seed0 + seeds):
        for recipe in times:
            r = speedrun.train(recipe, seed=seed, store=store, target=test_target)
            times[recipe].append(r.time_to_accuracy_s)
            print(f"  seed {seed} {Path(recipe).name}: {r.outcome} {r.time_to_accuracy_s or float('nan'):.1f} s, "
                  f"best {r.best_accuracy:.2%} (test)", flush=True)
    stats = {k: seed_stats(v) for k, v in times.items()}
    base, tuned = stats["fashion-mnist"], stats[str(out)]
    ratio = base.median_s / tuned.median_s if base.median_s and tuned.median_s else None
    print(f"\nbuilt-in: {base.passed}/{base.runs}, median {base.median_s}; tuned: {tuned.passed}/{tuned.runs}, "
          f"median {tuned.median_s}; speedup (median/median) {ratio}", flush=True)
    print(f"overhead: {result.overhead}; {load()}", flush=True)
    print(out.read_text(), flush=True)


def bench_workers(trials: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    space = work / "space.toml"
    space.write_text("[optim.lr]\nlow = 0.3\nhigh = 1.2\nlog = true\n")
    rows = []
    for workers in (1, 2):
        print(f"## {workers} worker(s), {trials} trials; {load()}", flush=True)
        result = tune("fashion-mnist", trials=trials, target=0.99, space=space, sampler="random", prune=False,
                      storage=str(work / f"w{workers}.journal"), study=f"w{workers}", store=str(work / "runs.sqlite"),
                      out=work / f"w{workers}.toml", workers=workers, overrides={"train.epochs": 0.5},
                      confirm_top=1, confirm_seeds=1, say=lambda line: print(line, flush=True))
        per_hour = trials / result.search_s * 3600
        rows.append((workers, result.search_s, per_hour, result.overhead))
        print(f"{workers} worker(s): search {result.search_s:.1f} s, {per_hour:.0f} trials/hour; "
              f"overhead {result.overhead}; {load()}", flush=True)
    print(f"\n2 workers / 1 worker: {rows[1][2] / rows[0][2]:.2f}x trials per hour", flush=True)


def bench_overhead(trials: int) -> None:
    """The sampler and storage alone: ask, suggest the default fashion-mnist space, a few user attributes,
    tell, on the journal file, with an instant objective; ms per trial as the study grows."""
    import optuna

    from speedrun.recipes import get_recipe
    from speedrun.tune.space import default_space
    from speedrun.tune.storage import open_storage
    from speedrun.tune.study import _suggest

    recipe = get_recipe("fashion-mnist")
    space = default_space(recipe)
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    study = optuna.create_study(storage=open_storage(str(work / "o.journal")), study_name="o",
                                sampler=optuna.samplers.TPESampler(seed=0, constant_liar=True))
    rng = __import__("random").Random(0)
    per = []
    for n in range(trials):
        t0 = time.perf_counter()
        trial = study.ask()
        params = {p.key: trial.suggest_categorical(p.key, list(p.choices)) if p.choices else _suggest(trial, p, recipe)
                  for p in space}
        for key in ("worker", "alive_at", "run_id", "outcome", "time_s", "best_accuracy", "wall_s"):
            trial.set_user_attr(key, 1.0)
        trial.report(0.9, step=25_000)
        study.tell(trial, 20 + rng.random() * 10 if n % 3 else 1e6)
        per.append(time.perf_counter() - t0)
    print(f"{load()}")
    for lo, hi in ((0, 10), (10, 30), (30, 60), (60, trials)):
        chunk = per[lo:hi]
        if chunk:
            print(f"trials {lo + 1}-{hi}: median {statistics.median(chunk) * 1e3:.1f} ms per trial "
                  f"(ask + suggest {len(space)} + 7 attributes + report + tell)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("part", choices=("tune", "workers", "overhead"))
    p.add_argument("--budget", default="30m")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--resume", type=Path, help="tune: the work folder of an earlier run whose search ended; "
                                               "confirm, test and compare it without searching again")
    p.add_argument("--target", type=float, help="tune: the validation target (default: the recipe's, 92%%)")
    p.add_argument("--seed0", type=int, default=200, help="tune: the first fresh test seed of the comparison")
    args = p.parse_args(argv)
    if args.part == "tune":
        bench_tune(args.budget, args.seeds, args.workers, args.resume, args.target, args.seed0)
    elif args.part == "overhead":
        bench_overhead(args.trials)
    else:
        bench_workers(args.trials)
    return 0


if __name__ == "__main__":
    sys.exit(main())
