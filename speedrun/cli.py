"""The ``speedrun`` command: every subcommand's parser, and train, lr-find, recipes, techniques, runs, show."""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import uuid
from typing import Any, Sequence

from rich.table import Table

from speedrun.argtypes import parse_sets, positive_int, target_fraction, technique_names
from speedrun.config import ConfigError
from speedrun.console import escape, new_console, percent, plural
from speedrun.data import DataError
from speedrun import inference_cli
from speedrun.data import cli as data_cli
from speedrun.store import OUTCOMES, RunStore, StoreError

EXIT_NOT_REACHED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

out = new_console()
err = new_console(stderr=True)


def _fail(message: str) -> int:
    err.print(f"[bold red]speedrun: error:[/] {escape(message)}", highlight=False)  # [x] is text, not style
    return EXIT_USAGE


def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


# ---------------------------------------------------------------- train

def _fmt_acc(accuracy: float | None) -> str:
    return "not evaluated" if accuracy is None else f"{accuracy:.2%}"


def _outcome_line(outcome: str, detail: str | None, *, sep: str = " ") -> str:
    """The outcome's words and the detail: ``interrupted at step 12``, not ``interrupted interrupted at
    step 12`` (a detail that starts with the words is not preceded by them again). Plain text: the
    caller escapes it."""
    words = outcome.replace("_", " ")
    if detail and detail.startswith(words):
        return detail
    return f"{words}{sep}{detail}" if detail else words


def _print_result(r) -> None:
    from speedrun.recipes.sized import NO_TARGET, SIZED

    style = {"reached": "bold green", "completed": "bold", "interrupted": "yellow"}.get(r.outcome, "bold red")
    words = r.outcome.replace("_", " ")
    line = _outcome_line(r.outcome, r.detail)
    out.print(f"[{style}]{words}[/]{escape(line[len(words):])}  (run {r.run_id}, recipe {escape(r.recipe.name)}, "
              f"seed {r.seed})", highlight=False)
    rows = [
        ("time-to-accuracy", f"{_fmt_s(r.time_to_accuracy_s)}  target {r.target:.2%}, best {_fmt_acc(r.best_accuracy)}"),
        ("clock", f"{_fmt_s(r.total_time_s)} = train {_fmt_s(r.train_time_s)} + evaluations "
                  f"{_fmt_s(r.eval_time_s)} ({len(r.curve)})"),
        ("epochs", f"{r.epochs:.2f} ({plural(r.steps, 'step')})"),
        ("images/s", f"{r.images_per_s:,.0f} (training, evals excluded)"),
        ("model", _model_flops(r)),
        ("MFU", _mfu(r)),
        ("dataset prep", f"{_fmt_s(r.prepare_s)} one-time, outside the clock"
                         + (" (cached)" if r.prepare_s == 0 else "")),
        ("device", f"{r.device}, {_threads(r.env)}{_ranks(r.env)}, {r.env.get('precision')}, torch {r.torch_version}"),
    ]
    if r.target >= NO_TARGET:  # nothing to reach: the whole schedule ran, and each evaluation says where it was
        rows[0] = ("final accuracy", f"{_fmt_acc(r.final_accuracy)}, best {_fmt_acc(r.best_accuracy)} (no target: "
                                     "--target T stops the clock at the first evaluation >= T)")
        rows.insert(1, ("evaluations", " · ".join(f"{p.accuracy:.2%} at {_fmt_s(p.elapsed_s)}" for p in r.curve)
                        or "none"))
    if r.recipe.name == SIZED:
        rows.insert(0, ("recipe", r.recipe.description))
    if r.val_accuracy is not None:  # a run with a validation split: both splits, the judged one marked
        judged = r.recipe.eval.split
        rows.insert(1, ("final accuracy", " · ".join(
            f"{split} {'-' if acc is None else f'{acc:.2%}'}" + (" (judged)" if split == judged else "")
            for split, acc in (("val", r.val_accuracy), ("test", r.test_accuracy)))
            + f"  (val: {r.env['val_split']['val_images']:,} held-out training images)"))
    if r.resumes:
        rows.insert(2, ("resumed", f"{r.resumes} time(s) from a checkpoint; the clock carries the time before, "
                                   "not the dead time between"))
    if r.checkpoints_written or r.checkpoint_error:
        rows.insert(2, ("checkpoints", f"{r.checkpoints_written} written, {_fmt_s(r.checkpoint_s)} in the clock, "
                                       f"{r.checkpoint_bytes / 1e6:.2f} MB each"
                                       + (f"; {r.checkpoint_error}" if r.checkpoint_error else "")))
    if r.outcome in ("interrupted", "failed") and r.checkpoints_written and not r.store_error:
        rows.append(("continue with", f"speedrun train --resume {r.run_id}  (from its last checkpoint)"))
    for name, value in rows:
        out.print(f"  {name:<17} {value}", markup=False, highlight=False)


def _ranks(env: dict) -> str:
    job = env.get("distributed")
    return f" x {job['world_size']} processes ({job['backend']})" if job else ""


def _threads(env: dict) -> str:
    n = env.get("threads")
    return plural(n, "thread") if isinstance(n, int) else f"{n} threads"


def _model_flops(r) -> str:
    text = f"{r.flops_per_image / 1e6:,.1f} MFLOP/image forward+backward"
    if r.flops_per_image and r.useful_flops_per_image < r.flops_per_image:
        waste = 1 - r.useful_flops_per_image / r.flops_per_image
        text += f", {r.useful_flops_per_image / 1e6:,.1f} useful ({waste:.0%} multiply conv zero padding)"
    return text


def _mfu(r) -> str:
    """Useful FLOP/s over the measured matmul peak and over the theoretical one, each labelled."""
    text = (f"{r.mfu:.0%} of the measured {r.peak_flops / 1e9:,.1f} GFLOP/s matmul peak "
            f"({r.useful_flops_per_s / 1e9:,.1f} useful GFLOP/s)")
    if r.mfu_theoretical is not None:
        text += (f"; {r.mfu_theoretical:.0%} of the theoretical {r.theoretical_peak_flops / 1e9:,.1f} GFLOP/s "
                 f"({r.theoretical_peak})")
    return text


def _seeds_summary(results: list, group_id: str) -> dict[str, Any]:
    from statistics import median

    from speedrun.measure.stats import seed_stats

    stats = seed_stats([r.time_to_accuracy_s for r in results])
    first = results[0]
    return {
        "group_id": group_id, "recipe": first.recipe.name, "target": first.target,
        "seeds": [r.seed for r in results], "reached": stats.passed == stats.runs,
        "time_to_accuracy_s": stats.median_s, "median_time_to_accuracy_s": stats.median_s,
        "min_time_to_accuracy_s": stats.min_s, "max_time_to_accuracy_s": stats.max_s,
        "cv_time_to_accuracy": stats.cv, "mlperf_time_to_accuracy_s": stats.mlperf_s,
        "pass_rate": stats.pass_rate, "train_time_s": median(r.train_time_s for r in results),
        "best_accuracy": max((r.best_accuracy for r in results if r.best_accuracy is not None), default=None),
        "epochs": median(r.epochs for r in results),
        "images_per_s": median(r.images_per_s for r in results), "mfu": median(r.mfu for r in results),
        "device": first.device, "torch_version": first.torch_version,
        "runs": [r.to_dict() for r in results],
    }


def cmd_train(args: argparse.Namespace) -> int:
    from speedrun.config import Recipe
    from speedrun.recipes.sized import SIZED, default_recipe
    from speedrun.train.run import Budget, resolve_recipe, train

    if args.nproc is not None:
        return _launch(args)
    if args.resume:
        return _resume(args)
    # Check everything that can be checked before any training starts.
    sets = parse_sets(args.set)
    if args.val_frac is not None:
        sets["data.val_frac"] = args.val_frac
    recipe = args.recipe or default_recipe(args.data)
    if recipe == SIZED:  # made from the data when training starts: only the given values are checked here
        Recipe(name=SIZED).override(sets)
        if not args.recipe and not args.json:
            out.print(f"[dim]no --recipe: the recipe is sized from {escape(args.data)}'s shape ('sized'; "
                      "speedrun recipes lists the built-in ones)[/]", highlight=False)
    else:
        recipe = resolve_recipe(recipe).override(sets)
    Budget.parse(args.budget)
    if args.save:
        _check_writable(args.save)
    store: RunStore | None = None
    store_problem = None
    try:
        store = RunStore(args.store) if args.store else RunStore(_default_store())
    except StoreError as e:
        store_problem = str(e)
        err.print(f"[bold red]speedrun: error:[/] {escape(str(e))}; training anyway, the run will not be recorded",
                  highlight=False)

    group_id = uuid.uuid4().hex[:10] if args.seeds > 1 else None
    results = []
    unrecorded = 0
    for i in range(args.seeds):
        seed = args.seed + i
        if args.seeds > 1 and not args.json:
            out.print(f"[dim]seed {seed} ({i + 1}/{args.seeds})[/]")
        run_seed = functools.partial(train, recipe, model=args.model, data=args.data, target=args.target, seed=seed,
                                     budget=args.budget, device=args.device, threads=args.threads, without=args.without,
                                     progress=not args.json and out.is_terminal, group_id=group_id, overrides=sets)
        try:
            r = run_seed(store=store)
        except StoreError as e:  # the store opened but cannot record the run's start: train this seed unrecorded
            store_problem, store = str(e), None
            err.print(f"[bold red]speedrun: error:[/] {escape(str(e))}; training anyway, the run will not be recorded",
                      highlight=False)
            r = run_seed(store=None)
        results.append(r)
        unrecorded += store is None or bool(r.store_error)
        if r.store_error:
            store_problem, store = r.store_error, None
            err.print(f"[bold red]speedrun: error:[/] {escape(r.store_error)}; the result below is not recorded",
                      highlight=False)
        if not args.json:
            _print_result(r)
        if args.save:
            _save_model(r, args.save, seed if args.seeds > 1 else None, quiet=args.json)
        if r.outcome == "interrupted":
            break

    if args.json:
        payload = results[0].to_dict() if args.seeds == 1 else _seeds_summary(results, group_id)
        print(json.dumps(payload, default=str))
    elif args.seeds > 1:
        s = _seeds_summary(results, group_id)
        out.print(f"\n[bold]{plural(len(results), 'seed')}[/] (group {group_id}): pass-rate {s['pass_rate']:.0%}, "
                  f"time-to-{percent(s['target'])} median {_fmt_s(s['median_time_to_accuracy_s'])}, "
                  f"min {_fmt_s(s['min_time_to_accuracy_s'])}, max {_fmt_s(s['max_time_to_accuracy_s'])}, "
                  f"CV {s['cv_time_to_accuracy'] or 0:.1%}, MLPerf aggregate "
                  f"{_fmt_s(s['mlperf_time_to_accuracy_s'])}", highlight=False)
    if store_problem:  # the runs' own exit code stands; the store's problem was printed as it happened
        err.print(f"[bold red]speedrun: error:[/] {unrecorded} of {len(results)} run(s) not recorded in the run "
                  f"store: {store_problem}", highlight=False)
    if any(r.outcome == "interrupted" for r in results):
        return EXIT_INTERRUPTED
    return 0 if all(r.reached or r.outcome == "completed" for r in results) else EXIT_NOT_REACHED


def _launch(args: argparse.Namespace) -> int:
    """``train --nproc N``: the same command in N processes on this machine, under torchrun (one data-parallel
    job; speedrun.train.distributed), each with cores/N threads unless --threads says."""
    import os
    import subprocess
    import sys

    from speedrun.train import distributed

    if distributed.launched():
        raise ConfigError("--nproc starts a job under torchrun; this process is already one of a job's ranks")
    argv = list(args.argv)
    for i, word in enumerate(argv):  # drop --nproc N (or --nproc=N): each rank runs the rest
        if word == "--nproc":
            del argv[i:i + 2]
            break
        if word.startswith("--nproc="):
            del argv[i]
            break
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    if args.threads is None:
        argv += ["--threads", str(threads)]
    if not args.json:
        err.print(f"[dim]{args.nproc} processes x {plural(threads, 'thread')} (torchrun --standalone); rank 0 "
                  "prints and records[/]", highlight=False)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        run(get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(args.nproc), "-m", "speedrun",
                                          *argv]))
    except ChildFailedError as e:  # a rank's exit status: rank 0's says the job's outcome (1: not reached, ...)
        failures = e.failures
        first = failures.get(0) or next(iter(failures.values()))
        for rank, failure in sorted(failures.items()):
            if failure.exitcode < 0:  # a rank killed by a signal wrote nothing of its own
                err.print(f"speedrun: error: rank {rank} was killed by {signal.Signals(-failure.exitcode).name}",
                          highlight=False)
        return first.exitcode if first.exitcode > 0 else EXIT_USAGE
    return 0


def _resume(args: argparse.Namespace) -> int:
    """``train --resume RUN_ID``: continue a run from its checkpoint, in its own store row."""
    from speedrun.train.run import train

    given = [flag for flag, value in (("--recipe", args.recipe), ("--set", args.set), ("--data", args.data), ("--model", args.model),
                                      ("--without", args.without), ("--target", args.target),
                                      ("--budget", args.budget), ("--seeds", args.seeds > 1)) if value]
    if given:
        raise ConfigError(f"--resume continues run {args.resume} as it was recorded (recipe, seed, target, "
                          f"budget): drop {', '.join(given)}")
    if args.save:
        _check_writable(args.save)
    store = RunStore(args.store or _default_store(), existing=True)
    r = train(resume=args.resume, store=store, device=args.device, threads=args.threads,
              progress=not args.json and out.is_terminal)
    if args.json:
        print(json.dumps(r.to_dict(), default=str))
    else:
        _print_result(r)
    if args.save:
        _save_model(r, args.save, None, quiet=args.json)
    if r.store_error:
        err.print(f"[bold red]speedrun: error:[/] {r.store_error}; the result above is not recorded", highlight=False)
    if r.outcome == "interrupted":
        return EXIT_INTERRUPTED
    return 0 if r.reached or r.outcome == "completed" else EXIT_NOT_REACHED


def _check_writable(path: str) -> None:
    """Refuse a --save path that could not be written, before any training."""
    import os
    from pathlib import Path

    folder = Path(path).parent
    if Path(path).is_dir():
        raise ConfigError(f"--save {path} is a folder; give a file name such as {Path(path) / 'model.pt'}")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"--save {path}: cannot write in {existing}")


def _save_model(r, path: str, seed: int | None, *, quiet: bool) -> None:
    import os
    from pathlib import Path

    if os.environ.get("RANK", "0") != "0":  # a data-parallel job's ranks hold the same model: rank 0 saves it
        return

    target = Path(path)
    if seed is not None:
        target = target.with_name(f"{target.stem}-seed{seed}{target.suffix}")
    if r.classifier is None:
        err.print(f"speedrun: no model saved: run {r.run_id} trained nothing ({r.outcome})", highlight=False)
        return
    r.save(target)
    if not quiet:
        accuracy = r.curve[-1].accuracy if r.curve else None
        out.print(f"  saved             {target}" + (f" (final accuracy {accuracy:.2%})" if accuracy is not None
                                                      else " (never evaluated)"), markup=False, highlight=False)


# ---------------------------------------------------------------- lr-find

def cmd_lr_find(args: argparse.Namespace) -> int:
    from pathlib import Path

    from speedrun.lr_find import check_range, lr_find, plot_png

    check_range(start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, beta=args.smoothing,
                diverge_factor=args.diverge_factor)
    plot = None if args.no_plot else Path(args.plot)
    if plot is not None and not plot.parent.is_dir():
        raise ConfigError(f"--plot {plot}: folder {plot.parent} does not exist")
    r = lr_find(args.recipe, data=args.data, seed=args.seed, device=args.device, threads=args.threads,
                steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr, beta=args.smoothing,
                diverge_factor=args.diverge_factor, overrides=parse_sets(args.set))
    if plot is not None:
        plot.write_bytes(plot_png(r))
    s = r.suggestion
    if args.json:
        print(json.dumps({**r.to_dict(), "plot": None if plot is None else str(plot)}))
    else:
        out.print(f"LR range test of [bold]{escape(r.recipe)}[/] (batch {r.batch_size}): {len(r.lrs)} of "
                  f"{plural(r.steps_planned, 'step')}, LR {r.lrs[0]:.3g} -> {r.lrs[-1]:.3g}, {r.seconds:.1f} s; "
                  + escape(_outcome_line(r.outcome, r.detail, sep=": ")),
                  highlight=False)
        unit = f"optim.lr (per {r.lr_batch_size} examples)"
        peaked = r.method == "min_loss"
        rows = [("steepest descent", s.steepest_lr, "" if peaked else "  <- suggested: a constant or decaying LR"),
                ("min loss / 10", s.min_loss_lr_div10, ""),
                ("min loss", s.min_loss_lr, f"  <- suggested: the peak of a {r.schedule} schedule" if peaked else
                 "  (a peak that anneals could go this high)"),
                ("recipe's LR", r.recipe_lr, "")]
        for name, lr, note in rows:
            value = "-" if lr is None else f"LR {lr:.3g} = {unit} {r.to_optim_lr(lr):.3g}"
            out.print(f"  {name:<17} {value}{note}", markup=False, highlight=False)
        if r.suggested_optim_lr is not None:
            sets = " ".join(f"--set {key}={value:.3g}" for key, value in r.suggested_sets().items())
            why = (f"the peak of the recipe's {r.schedule} schedule" if peaked else
                   f"the recipe's {r.schedule} schedule starts there")
            out.print(f"  try               speedrun train {sets}  ({why}"
                      + ("; Muon's LR keeps its ratio to optim.lr, as in the sweep" if r.recipe_muon_lr else "")
                      + ")", markup=False, highlight=False)
            if peaked and r.min_at_end:
                out.print("  note              the loss was still falling at the end of the sweep: raise --end-lr "
                          "to see its minimum", markup=False, highlight=False)
        else:
            out.print("  no suggestion: the smoothed loss never fell; lower --start-lr or raise --end-lr",
                      highlight=False)
        if plot is not None:
            out.print(f"  plot              {plot}", markup=False, highlight=False)
        out.print(f"  device            {r.device}, {_threads(r.env)}, {r.precision}, "
                  f"torch {r.torch_version}", markup=False, highlight=False)
    if r.outcome == "interrupted":
        return EXIT_INTERRUPTED
    return 0 if r.suggested_lr is not None else EXIT_NOT_REACHED


# ---------------------------------------------------------------- recipes, runs, show

def cmd_recipes(args: argparse.Namespace) -> int:
    from speedrun.recipes import RECIPES, get_recipe, load_toml
    from speedrun.recipes.sized import SIZED

    if args.name:
        from speedrun.techniques.registry import enabled_techniques

        # A .toml file resolves against its base, as `train --recipe my.toml` does.
        if args.name == SIZED:
            recipe = _sized_recipe_for(args.data)
        elif args.data:
            raise ConfigError("--data only applies to 'sized' (a recipe made from the data)")
        else:
            recipe = load_toml(args.name) if args.name.endswith(".toml") else get_recipe(args.name)
        if args.json:
            print(recipe.to_json())
        else:
            out.print(f"[bold]techniques:[/] {', '.join(enabled_techniques(recipe)) or 'none'}")
            for section, value in recipe.to_dict().items():
                if isinstance(value, dict):
                    out.print(f"[bold]{section}[/]")
                    for key, v in value.items():
                        out.print(f"  {section}.{key} = {v!r}", markup=False, highlight=False)
                else:
                    out.print(f"{section} = {value!r}", markup=False, highlight=False)
        return 0
    if args.json:
        print(json.dumps([{"name": s.name, "description": s.description, "target": s.build().target}
                          for s in RECIPES.values()]))
        return 0
    table = Table("recipe", "target", "description")
    for spec in RECIPES.values():
        table.add_row(escape(spec.name), percent(spec.build().target), escape(spec.description))
    table.add_row(SIZED, "none", "made from a dataset's shape: the default of speedrun train --data PATH "
                                 "(speedrun recipes sized --data PATH shows it)")
    out.print(table)
    return 0


def _sized_recipe_for(data: str | None):
    """The recipe ``speedrun train --data DATA`` would size (the data prepared, as training would)."""
    from speedrun.config import Recipe
    from speedrun.recipes.sized import SIZED, sized_for
    from speedrun.train.run import prepare_data

    if not data:
        raise ConfigError("recipe 'sized' is made from a dataset's shape: give it with --data PATH")
    _, images = prepare_data(Recipe(name=SIZED).override({"data.source": data}).data)
    return sized_for(images, source=data)


def cmd_techniques(args: argparse.Namespace) -> int:
    from speedrun.techniques.registry import TECHNIQUES

    records = [{k: v for k, v in vars(t).items() if not callable(v)} for t in TECHNIQUES.values()]
    if args.json:
        print(json.dumps(records))
        return 0
    for t in records:
        out.print(f"[bold]{escape(t['name'])}[/]: {escape(t['summary'])}", highlight=False)
        for label in ("source", "helps_when", "cost", "switch"):
            out.print(f"    {label.replace('_', ' '):<11} {t[label]}", markup=False, highlight=False)
    return 0


def _default_store():
    from speedrun.paths import default_store

    return default_store()


def _open_store(args) -> RunStore:
    """The store a reading command reads: it must exist (a mistyped --store is not created)."""
    return RunStore(args.store or _default_store(), existing=True)


def cmd_runs(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if args.mark_lost:
        lost = store.mark_lost()
        err.print(f"speedrun: recorded {len(lost)} run(s) as lost" + (f": {', '.join(lost)}" if lost else ""),
                  highlight=False)
    group = (store.find_group(args.group) or args.group) if args.group else None  # a unique prefix will do
    runs = store.list_runs(recipe=args.recipe, outcome=args.outcome, group=group, limit=args.limit)
    if args.json:
        print(json.dumps(runs))
        return 0
    _print_runs(runs)
    if not runs:
        out.print(f"[dim]no runs in {escape(str(store.path))} match[/]")
    elif group:
        _print_group_stats(runs)
    return 0


def _print_runs(runs: list[dict[str, Any]]) -> None:
    table = Table("id", "started (UTC)", "recipe", "seed", "outcome", "target", "time-to-acc", "best acc",
                  "epochs", "device")
    for run in runs:
        s = run["summary"]
        best = run["best_accuracy"]
        outcome = run["outcome"] + (", resumable" if run["resumable"] else "") + (
            f" ({run['resumes']}x resumed)" if run["resumes"] else "")
        table.add_row(run["id"], run["created_at"].replace("+00:00", ""), escape(run["recipe_name"]),
                      str(run["seed"]), outcome, f"{run['target']:.2%}" if run["target"] and run["target"] < 1 else "-",
                      _fmt_s(run["time_to_accuracy_s"]),
                      f"{best:.2%}" if best is not None else "not evaluated" if run["outcome"] != "running" else "-",
                      f"{s['epochs']:.2f}" if "epochs" in s else "-", escape(run["device"] or "-"))
    out.print(table)
    if any(run["resumable"] for run in runs):
        out.print("[dim]continue a resumable run from its checkpoint: speedrun train --resume ID[/]")


def _print_group_stats(runs: list[dict[str, Any]]) -> None:
    from speedrun.compare import group_statistics

    stats = group_statistics(runs)
    unfinished = len(runs) - sum(s["runs"] for s in stats)
    for s in stats:
        target = "?" if s["target"] is None else percent(s["target"])
        out.print(f"{s['recipe']}: {plural(s['runs'], 'finished run')}, pass-rate "
                  f"{s['pass_rate']:.0%}, time-to-{target} median {_fmt_s(s['median_s'])}, min {_fmt_s(s['min_s'])}, "
                  f"max {_fmt_s(s['max_s'])}" + ("" if s["cv"] is None else f", CV {s['cv']:.1%}")
                  + ("" if s["mlperf_s"] is None else f", MLPerf aggregate {_fmt_s(s['mlperf_s'])}"),
                  markup=False, highlight=False)
    if unfinished:
        out.print(f"{plural(unfinished, 'run')} not finished (running, interrupted, failed or lost): not counted",
                  markup=False, highlight=False)


def _show_group(store: RunStore, group_id: str, *, as_json: bool) -> int:
    runs = store.list_runs(group=group_id, limit=None)
    try:
        ablation = store.get_ablation(group_id)["id"]
    except StoreError:
        ablation = None
    if as_json:
        from speedrun.compare import group_statistics

        print(json.dumps({"group_id": group_id, "ablation": ablation is not None,
                          "statistics": group_statistics(runs), "runs": runs}))
        return 0
    kind = "ablation" if ablation else "group"
    out.print(f"[bold]{kind} {group_id}[/]: {plural(len(runs), 'run')}", highlight=False)
    _print_runs(runs)
    _print_group_stats(runs)
    if ablation:
        out.print(f"[dim]its table: speedrun ablate --resume {group_id}; a run: speedrun show RUN_ID[/]")
    else:
        out.print("[dim]a run in full: speedrun show RUN_ID[/]")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    store = _open_store(args)
    try:
        run = store.get_run(args.run_id)
    except StoreError as e:
        group = store.find_group(args.run_id)  # `train --seeds N` and `ablate` print a group id
        if group is None and "ambiguous" in str(e):
            raise
        if group is None:
            raise StoreError(f"no run or group with id {args.run_id!r} in {store.path}") from None
        return _show_group(store, group, as_json=args.json)
    if args.json:
        print(json.dumps(run))
        return 0
    s = run["summary"]
    out.print(f"[bold]run {run['id']}[/] {escape(run['recipe_name'])} seed {run['seed']}: "
              f"{escape(_outcome_line(run['outcome'], run['detail']))}", highlight=False)
    for key in ("time_to_accuracy_s", "total_time_s", "train_time_s", "eval_time_s", "prepare_s",
                "best_accuracy", "epochs", "images_per_s", "flops_per_image", "mfu", "resumes", "checkpoints_written",
                "checkpoint_s"):
        if key in s:
            value = "not evaluated" if key == "best_accuracy" and s[key] is None else s[key]
            out.print(f"  {key:<20} {value}", markup=False, highlight=False)
    if run["group_id"]:
        out.print(f"  {'group':<20} {run['group_id']} (speedrun show {run['group_id']})", highlight=False)
    out.print("[bold]environment[/]")
    for key, value in run["env"].items():
        if key != "traceback":
            out.print(f"  {key:<20} {value}", markup=False, highlight=False)
    if run["curve"]:
        table = Table("elapsed s", "epoch", "step", "accuracy", "test loss", "train loss", title="curve")
        for p in run["curve"]:
            table.add_row(f"{p['elapsed_s']:.1f}", f"{p['epoch']:.2f}", str(p["step"]), f"{p['accuracy']:.2%}",
                          f"{p['test_loss']:.4f}", "-" if p["train_loss"] is None else f"{p['train_loss']:.4f}")
        out.print(table)
    out.print(f"[dim]recipe: speedrun show {run['id']} --json | jq .recipe[/]")
    return 0


# ---------------------------------------------------------------- parser

class _CommandsHelp(argparse.HelpFormatter):
    """Each command and its help on one line (the help strings stay within 62 columns).

    argparse measures the command names without their extra indent, so the longest name
    (``techniques``) got a line of its own, its help wrapped onto the next.
    """

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):
            self._action_max_length = max(self._action_max_length,
                                          self._current_indent + 2 + max(map(len, action.choices)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speedrun", description="Train a network to a target accuracy as fast as the hardware allows, and "
                                     "measure time-to-accuracy.",
        epilog="speedrun COMMAND --help shows a command's options.",
        formatter_class=_CommandsHelp)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_option(p):
        p.add_argument("--store", help="run store (SQLite file); default $SPEEDRUN_STORE or "
                                       "$SPEEDRUN_HOME/runs.sqlite (~/.speedrun/runs.sqlite)")

    t = sub.add_parser("train", help="train a recipe to a target accuracy; report time-to-accuracy")
    t.add_argument("--recipe", help="built-in recipe name or a .toml file (default: fashion-mnist; with "
                                    "--data of your own, 'sized': a recipe sized from the data)")
    t.add_argument("--data", help="dataset: a built-in name or a path (default: the recipe's)")
    t.add_argument("--model", help="a model of your own: package.module:factory, called as "
                                   "factory(in_channels=, num_classes=, image_size=) (default: the recipe's)")
    t.add_argument("--without", type=technique_names, action="extend", default=[], metavar="NAME[,NAME...]",
                   help="take these catalog techniques out of the recipe (see speedrun techniques)")
    t.add_argument("--target", type=target_fraction, help="held-out accuracy to reach, in (0, 1] or as 92%%")
    t.add_argument("--budget", help="give up after this long: seconds (90, 90s, 2m) or epochs (3ep)")
    t.add_argument("--val-frac", type=float, metavar="FRAC",
                   help="hold this fraction of the training split out as a validation split (data.val_frac; "
                        "judge the target on it with --set eval.split=val)")
    t.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    t.add_argument("--seeds", type=positive_int, default=1, help="number of seeds to run (default 1)")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.epochs=3 (repeatable)")
    t.add_argument("--save", metavar="PATH", help="save the trained model there (with --seeds N: one file per "
                                                  "seed, PATH with -seedK before its suffix); see predict")
    t.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted, lost or failed run from its "
                                                      "checkpoint, as it was recorded (see speedrun runs)")
    t.add_argument("--nproc", type=positive_int, metavar="N",
                   help="data-parallel over N processes on this machine (launches torchrun; train.batch_size "
                        "is the global batch); several machines: torchrun ... -m speedrun train")
    t.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    store_option(t)
    t.set_defaults(func=cmd_train)

    lf = sub.add_parser("lr-find", help="LR range test: a peak LR for the recipe's schedule")
    lf.add_argument("--recipe", default="fashion-mnist", help="built-in recipe name or a .toml file")
    lf.add_argument("--data", help="dataset: a built-in name or a path (default: the recipe's)")
    lf.add_argument("--seed", type=int, default=0)
    lf.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    lf.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    lf.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, e.g. --set train.batch_size=512 (repeatable)")
    lf.add_argument("--steps", type=int, default=100, help="training steps of the sweep (default 100, >= 10)")
    lf.add_argument("--start-lr", type=float, default=1e-5, help="first LR, absolute at the recipe's batch "
                                                                 "size (default 1e-5)")
    lf.add_argument("--end-lr", type=float, default=10.0, help="last LR, absolute (default 10)")
    lf.add_argument("--smoothing", type=float, metavar="BETA",
                    help="beta of the loss's moving average, in [0, 1) (default 1 - 10/steps: 0.9 at 100 steps)")
    lf.add_argument("--diverge-factor", type=float, default=4.0,
                    help="stop once the smoothed loss exceeds this multiple of its best (default 4)")
    lf.add_argument("--plot", default="lr-find.png", help="PNG to write (default lr-find.png)")
    lf.add_argument("--no-plot", action="store_true", help="write no plot")
    lf.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    lf.set_defaults(func=cmd_lr_find)

    r = sub.add_parser("recipes", help="list the built-in recipes, or show one (or a .toml) in full")
    r.add_argument("name", nargs="?", help="a built-in recipe's name, or a .toml recipe file")
    r.add_argument("--data", help="with 'sized': the dataset to size it from (a built-in name or a path)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_recipes)

    te = sub.add_parser("techniques", help="list the speedup techniques: what, from where, when they help")
    te.add_argument("--json", action="store_true")
    te.set_defaults(func=cmd_techniques)

    ls = sub.add_parser("runs", help="list stored runs, newest first")
    ls.add_argument("--recipe")
    ls.add_argument("--outcome", choices=OUTCOMES)
    ls.add_argument("--group", help="runs of one group (train --seeds N, ablate), with their statistics; "
                                    "a unique prefix will do")
    ls.add_argument("--limit", type=positive_int, default=50)
    ls.add_argument("--mark-lost", action="store_true",
                    help="record runs shown as lost (running, but their process on this host is gone) as lost "
                         "for good; listing alone never writes")
    ls.add_argument("--json", action="store_true")
    store_option(ls)
    ls.set_defaults(func=cmd_runs)

    sh = sub.add_parser("show", help="show a stored run, or a group of runs with its statistics")
    sh.add_argument("run_id", help="a run id or a group id (train --seeds N, ablate), or a unique prefix")
    sh.add_argument("--json", action="store_true")
    store_option(sh)
    sh.set_defaults(func=cmd_show)

    data_cli.add_parser(sub)
    inference_cli.add_parsers(sub)
    from speedrun import ablate, compare, report
    from speedrun.tune import cli as tune_cli

    ablate.add_parser(sub)
    tune_cli.add_parser(sub)
    compare.add_parser(sub)
    report.add_parser(sub)
    return parser


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    import os
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # train --nproc runs the same command in each rank
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # a killed job is recorded like Ctrl-C
    if os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ:  # a job's rank (torchrun)
        sys.stdout = open(os.devnull, "w")  # rank 0 prints the job's results; every rank's errors reach stderr
    try:
        return args.func(args)
    except (ConfigError, DataError, StoreError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        err.print("speedrun: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (speedrun runs | head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if (job := sys.modules.get("speedrun.train.distributed")) is not None:
            job.shutdown()  # leave the job's process group, if this process joined one
