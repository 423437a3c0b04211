"""The ``speedrun`` command: train, lr-find, recipes, runs, show."""
from __future__ import annotations

import argparse
import functools
import json
import signal
import uuid
from typing import Any, Sequence

from rich.markup import escape
from rich.table import Table

from speedrun.argtypes import parse_sets, positive_int, target_fraction, technique_names
from speedrun.config import ConfigError
from speedrun.console import new_console
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

def _print_result(r) -> None:
    status = {"reached": "[bold green]reached[/]", "interrupted": "[yellow]interrupted[/]"}.get(
        r.outcome, f"[bold red]{r.outcome.replace('_', ' ')}[/]")
    out.print(f"{status} {r.detail}  (run {r.run_id}, recipe {r.recipe.name}, seed {r.seed})", highlight=False)
    rows = [
        ("time-to-accuracy", f"{_fmt_s(r.time_to_accuracy_s)}  target {r.target:.2%}, best {r.best_accuracy:.2%}"),
        ("clock", f"{_fmt_s(r.total_time_s)} = train {_fmt_s(r.train_time_s)} + evaluations "
                  f"{_fmt_s(r.eval_time_s)} ({len(r.curve)})"),
        ("epochs", f"{r.epochs:.2f} ({r.steps} steps)"),
        ("images/s", f"{r.images_per_s:,.0f} (training, evals excluded)"),
        ("model", f"{r.flops_per_image / 1e6:,.1f} MFLOP/image forward+backward"),
        ("MFU", f"{r.mfu:.0%}: {r.flops_per_s / 1e9:.1f} GFLOP/s of a measured {r.peak_flops / 1e9:.1f} "
                f"GFLOP/s matmul peak"),
        ("dataset prep", f"{_fmt_s(r.prepare_s)} one-time, outside the clock"
                         + (" (cached)" if r.prepare_s == 0 else "")),
        ("device", f"{r.device}, {r.env.get('threads')} threads, {r.env.get('precision')}, torch {r.torch_version}"),
    ]
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
        out.print(f"  {name:<17} {value}", highlight=False)


def _seeds_summary(results: list, group_id: str) -> dict[str, Any]:
    from statistics import median

    from speedrun.measure.stats import seed_stats

    stats = seed_stats([r.time_to_accuracy_s for r in results])
    first = results[0]
    return {
        "run_id": group_id, "group_id": group_id, "recipe": first.recipe.name, "target": first.target,
        "seeds": [r.seed for r in results], "reached": stats.passed == stats.runs,
        "time_to_accuracy_s": stats.median_s, "median_time_to_accuracy_s": stats.median_s,
        "min_time_to_accuracy_s": stats.min_s, "max_time_to_accuracy_s": stats.max_s,
        "cv_time_to_accuracy": stats.cv, "mlperf_time_to_accuracy_s": stats.mlperf_s,
        "pass_rate": stats.pass_rate, "train_time_s": median(r.train_time_s for r in results),
        "best_accuracy": max(r.best_accuracy for r in results), "epochs": median(r.epochs for r in results),
        "images_per_s": median(r.images_per_s for r in results), "mfu": median(r.mfu for r in results),
        "device": first.device, "torch_version": first.torch_version,
        "runs": [r.to_dict() for r in results],
    }


def cmd_train(args: argparse.Namespace) -> int:
    from speedrun.train.run import Budget, resolve_recipe, train

    if args.resume:
        return _resume(args)
    # Check everything that can be checked before any training starts.
    recipe = resolve_recipe(args.recipe).override(parse_sets(args.set))
    Budget.parse(args.budget)
    if args.save:
        _check_writable(args.save)
    store: RunStore | None = None
    store_problem = None
    try:
        store = RunStore(args.store) if args.store else RunStore(_default_store())
    except StoreError as e:
        store_problem = str(e)
        err.print(f"[bold red]speedrun: error:[/] {e}; training anyway, the run will not be recorded",
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
                                     progress=not args.json and out.is_terminal, group_id=group_id)
        try:
            r = run_seed(store=store)
        except StoreError as e:  # the store opened but cannot record the run's start: train this seed unrecorded
            store_problem, store = str(e), None
            err.print(f"[bold red]speedrun: error:[/] {e}; training anyway, the run will not be recorded",
                      highlight=False)
            r = run_seed(store=None)
        results.append(r)
        unrecorded += store is None or bool(r.store_error)
        if r.store_error:
            store_problem, store = r.store_error, None
            err.print(f"[bold red]speedrun: error:[/] {r.store_error}; the result below is not recorded",
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
        out.print(f"\n[bold]{len(results)} seeds[/] (group {group_id}): pass-rate {s['pass_rate']:.0%}, "
                  f"time-to-{s['target']:.0%} median {_fmt_s(s['median_time_to_accuracy_s'])}, "
                  f"min {_fmt_s(s['min_time_to_accuracy_s'])}, max {_fmt_s(s['max_time_to_accuracy_s'])}, "
                  f"CV {s['cv_time_to_accuracy'] or 0:.1%}, MLPerf aggregate "
                  f"{_fmt_s(s['mlperf_time_to_accuracy_s'])}", highlight=False)
    if store_problem:  # the runs' own exit code stands; the store's problem was printed as it happened
        err.print(f"[bold red]speedrun: error:[/] {unrecorded} of {len(results)} run(s) not recorded in the run "
                  f"store: {store_problem}", highlight=False)
    if any(r.outcome == "interrupted" for r in results):
        return EXIT_INTERRUPTED
    return 0 if all(r.reached for r in results) else EXIT_NOT_REACHED


def _resume(args: argparse.Namespace) -> int:
    """``train --resume RUN_ID``: continue a run from its checkpoint, in its own store row."""
    from speedrun.train.run import train

    given = [flag for flag, value in (("--set", args.set), ("--data", args.data), ("--model", args.model),
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
    return 0 if r.reached else EXIT_NOT_REACHED


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
    from pathlib import Path

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
                                                      else " (never evaluated)"), highlight=False)


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
        out.print(f"LR range test of [bold]{r.recipe}[/] (batch {r.batch_size}): {len(r.lrs)} of {r.steps_planned} "
                  f"steps, LR {r.lrs[0]:.3g} -> {r.lrs[-1]:.3g}, {r.seconds:.1f} s; {r.outcome}"
                  + (f": {r.detail}" if r.detail else ""),
                  highlight=False)
        unit = f"optim.lr (per {r.lr_batch_size} examples)"
        rows = [("steepest descent", s.steepest_lr, "  <- suggested"),
                ("min loss / 10", s.min_loss_lr_div10, ""),
                ("min loss", s.min_loss_lr, "  (a one-cycle peak rarely goes above this)"),
                ("recipe's LR", r.recipe_lr, "")]
        for name, lr, note in rows:
            value = "-" if lr is None else f"LR {lr:.3g} = {unit} {r.to_optim_lr(lr):.3g}"
            out.print(f"  {name:<17} {value}{note}", highlight=False)
        if r.suggested_optim_lr is not None:
            out.print(f"  try               speedrun train --set optim.lr={r.suggested_optim_lr:.3g}  "
                      "(a peak LR: the recipe's schedule scales it)", highlight=False)
        else:
            out.print("  no suggestion: the smoothed loss never fell; lower --start-lr or raise --end-lr",
                      highlight=False)
        if plot is not None:
            out.print(f"  plot              {plot}", highlight=False)
        out.print(f"  device            {r.device}, {r.env.get('threads')} threads, {r.precision}, "
                  f"torch {r.torch_version}", highlight=False)
    if r.outcome == "interrupted":
        return EXIT_INTERRUPTED
    return 0 if r.suggested_lr is not None else EXIT_NOT_REACHED


# ---------------------------------------------------------------- recipes, runs, show

def cmd_recipes(args: argparse.Namespace) -> int:
    from speedrun.recipes import RECIPES, get_recipe

    if args.name:
        from speedrun.techniques.registry import enabled_techniques

        recipe = get_recipe(args.name)
        if args.json:
            print(recipe.to_json())
        else:
            out.print(f"[bold]techniques:[/] {', '.join(enabled_techniques(recipe)) or 'none'}")
            for section, value in recipe.to_dict().items():
                if isinstance(value, dict):
                    out.print(f"[bold]{section}[/]")
                    for key, v in value.items():
                        out.print(f"  {section}.{key} = {v!r}", highlight=False)
                else:
                    out.print(f"{section} = {value!r}", highlight=False)
        return 0
    if args.json:
        print(json.dumps([{"name": s.name, "description": s.description, "target": s.build().target}
                          for s in RECIPES.values()]))
        return 0
    table = Table("recipe", "target", "description")
    for spec in RECIPES.values():
        table.add_row(spec.name, f"{spec.build().target:.0%}", spec.description)
    out.print(table)
    return 0


def cmd_techniques(args: argparse.Namespace) -> int:
    from speedrun.techniques.registry import TECHNIQUES

    records = [{k: v for k, v in vars(t).items() if not callable(v)} for t in TECHNIQUES.values()]
    if args.json:
        print(json.dumps(records))
        return 0
    for t in records:
        out.print(f"[bold]{t['name']}[/]: {t['summary']}", highlight=False)
        for label in ("source", "helps_when", "cost", "switch"):
            out.print(f"    {label.replace('_', ' '):<11} {t[label]}", highlight=False)
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
    runs = store.list_runs(recipe=args.recipe, outcome=args.outcome, group=args.group, limit=args.limit)
    if args.json:
        print(json.dumps(runs))
        return 0
    table = Table("id", "started (UTC)", "recipe", "seed", "outcome", "target", "time-to-acc", "best acc",
                  "epochs", "device")
    for run in runs:
        s = run["summary"]
        outcome = run["outcome"] + (", resumable" if run["resumable"] else "") + (
            f" ({run['resumes']}x resumed)" if run["resumes"] else "")
        table.add_row(run["id"], run["created_at"].replace("+00:00", ""), run["recipe_name"], str(run["seed"]),
                      outcome, f"{run['target']:.2%}" if run["target"] else "-",
                      _fmt_s(run["time_to_accuracy_s"]),
                      f"{run['best_accuracy']:.2%}" if run["best_accuracy"] is not None else "-",
                      f"{s['epochs']:.2f}" if "epochs" in s else "-", run["device"] or "-")
    out.print(table)
    if not runs:
        out.print(f"[dim]no runs in {store.path} match[/]")
    elif any(run["resumable"] for run in runs):
        out.print("[dim]continue a resumable run from its checkpoint: speedrun train --resume ID[/]")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    run = _open_store(args).get_run(args.run_id)
    if args.json:
        print(json.dumps(run))
        return 0
    s = run["summary"]
    out.print(f"[bold]run {run['id']}[/] {run['recipe_name']} seed {run['seed']}: {run['outcome']} "
              f"{run['detail'] or ''}", highlight=False)
    for key in ("time_to_accuracy_s", "total_time_s", "train_time_s", "eval_time_s", "prepare_s",
                "best_accuracy", "epochs", "images_per_s", "flops_per_image", "mfu", "resumes", "checkpoints_written",
                "checkpoint_s"):
        if key in s:
            out.print(f"  {key:<20} {s[key]}", highlight=False)
    out.print("[bold]environment[/]")
    for key, value in run["env"].items():
        if key != "traceback":
            out.print(f"  {key:<20} {value}", highlight=False)
    if run["curve"]:
        table = Table("elapsed s", "epoch", "step", "accuracy", "test loss", "train loss", title="curve")
        for p in run["curve"]:
            table.add_row(f"{p['elapsed_s']:.1f}", f"{p['epoch']:.2f}", str(p["step"]), f"{p['accuracy']:.2%}",
                          f"{p['test_loss']:.4f}", "-" if p["train_loss"] is None else f"{p['train_loss']:.4f}")
        out.print(table)
    out.print(f"[dim]recipe: speedrun show {run['id']} --json | jq .recipe[/]")
    return 0


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speedrun", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_option(p):
        p.add_argument("--store", help="run store (SQLite file); default $SPEEDRUN_STORE or "
                                       "$SPEEDRUN_HOME/runs.sqlite (~/.speedrun/runs.sqlite)")

    t = sub.add_parser("train", help="train a recipe to a target accuracy and report time-to-accuracy")
    t.add_argument("--recipe", default="fashion-mnist", help="built-in recipe name or a .toml file "
                                                              "(default: fashion-mnist)")
    t.add_argument("--data", help="dataset: a built-in name or a path (default: the recipe's)")
    t.add_argument("--model", help="a model of your own: package.module:factory, called as "
                                   "factory(in_channels=, num_classes=, image_size=) (default: the recipe's)")
    t.add_argument("--without", type=technique_names, action="extend", default=[], metavar="NAME[,NAME...]",
                   help="take these catalog techniques out of the recipe (see speedrun techniques)")
    t.add_argument("--target", type=target_fraction, help="held-out accuracy to reach, in (0, 1] or as 92%%")
    t.add_argument("--budget", help="give up after this long: seconds (90, 90s, 2m) or epochs (3ep)")
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
    t.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    store_option(t)
    t.set_defaults(func=cmd_train)

    lf = sub.add_parser("lr-find", help="LR range test: train briefly with a growing LR and suggest a peak LR")
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

    r = sub.add_parser("recipes", help="list built-in recipes, or show one in full")
    r.add_argument("name", nargs="?")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_recipes)

    te = sub.add_parser("techniques", help="list the speedup techniques: what, from where, when they help")
    te.add_argument("--json", action="store_true")
    te.set_defaults(func=cmd_techniques)

    ls = sub.add_parser("runs", help="list stored runs, newest first")
    ls.add_argument("--recipe")
    ls.add_argument("--outcome", choices=OUTCOMES)
    ls.add_argument("--group", help="runs of one multi-seed group")
    ls.add_argument("--limit", type=positive_int, default=50)
    ls.add_argument("--mark-lost", action="store_true",
                    help="record runs shown as lost (running, but their process on this host is gone) as lost "
                         "for good; listing alone never writes")
    ls.add_argument("--json", action="store_true")
    store_option(ls)
    ls.set_defaults(func=cmd_runs)

    sh = sub.add_parser("show", help="show one stored run: summary, environment, curve")
    sh.add_argument("run_id", help="run id or a unique prefix of it")
    sh.add_argument("--json", action="store_true")
    store_option(sh)
    sh.set_defaults(func=cmd_show)

    data_cli.add_parser(sub)
    inference_cli.add_parsers(sub)
    from speedrun import ablate, compare, report

    ablate.add_parser(sub)
    compare.add_parser(sub)
    report.add_parser(sub)
    return parser


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # a killed job is recorded like Ctrl-C
    try:
        return args.func(args)
    except (ConfigError, DataError, StoreError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        err.print("speedrun: interrupted")
        return EXIT_INTERRUPTED
