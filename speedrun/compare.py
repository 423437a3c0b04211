"""``speedrun compare``: group stored runs by environment and recipe, and split differences into
hardware and software parts.

**Like with like.** Only runs on the same dataset (the recipe's data source by its last path
component) to the same target are compared: the runs are split by (dataset, target), the set with
the most finished runs is compared (or the one ``--data``/``--target`` pick), and the others are
named as left out.

**Groups.** Runs are grouped by the keys of ``--by`` (default ``device,precision,recipe``; see
:data:`KEYS`). ``recipe`` is the recipe's name plus a short hash of its resolved values (the data
source by its last path component, so the same dataset at another path still matches): runs of
the same name with other overrides are other recipes. They are shown by name, with the values that
tell same-named recipes apart (``fashion-mnist[train.epochs=3]``; see :func:`recipe_labels`). Per
group: the median time-to-accuracy over its runs, unreached runs counting as slower than any (see
``speedrun.attribution``), and the pass-rate. Only finished runs count (reached, budget exhausted,
diverged).

**The split.** Every group ``g`` is compared with the fastest group ``r``: ``total = t(g) / t(r)``.
Its key has a hardware part (``device``, ``cpu``, ``threads``: :data:`HARDWARE_KEYS`) and a software
part (every other key). When only one part differs, the whole ratio is that part. When both
differ, the cross groups are needed: ``X`` = g's software on r's hardware, ``Y`` = r's software on
g's hardware. Then

- via X: hardware = t(g)/t(X), software = t(X)/t(r);
- via Y: hardware = t(Y)/t(r), software = t(g)/t(Y);
- with both, the geometric mean of the two paths (the Shapley value of a two-factor product, as
  in a Fisher index): hardware = sqrt(t(g) t(Y) / (t(X) t(r))), software = total / hardware.

Assumptions: time-to-accuracy is a product of a hardware factor and a software factor (a device
speeds every recipe up by the same factor); the runs of a group are exchangeable repeats (seeds) on
an otherwise quiet machine; all groups train to the same target on the same dataset (ensured by
the split above). ``path_disagreement`` = (hardware via X) / (hardware via Y) tests the first
assumption where both cross groups exist: 1 when it holds; far from 1 means the hardware gain
depends on the software (e.g. channels_last pays on one CPU only), and the split is an average.
With neither cross group, no split is made: run the same recipe on both machines first.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from speedrun.argtypes import target_fraction
from speedrun.attribution import RESAMPLES, Ratio, Sample, ratio_of_products
from speedrun.config import KEEPING_KEYS, ConfigError, flatten_keys, from_dict
from speedrun.console import escape, new_console, percent, plural
from speedrun.measure.stats import seed_stats
from speedrun.store import RunStore

FINISHED = ("reached", "completed", "budget_exhausted", "diverged")
HARDWARE_KEYS = frozenset({"device", "cpu", "threads"})
LABEL_KEYS = 3  # a label names at most this many distinguishing values; the rest go under the table


@functools.lru_cache(maxsize=4096)
def _completed(stored: str) -> dict[str, Any]:
    """A stored recipe (JSON) as this version reads it: every field added since at its default (what runs
    did before the field existed) and renamed keys mapped, so one recipe keys alike in runs stored before
    and after a field was added. As stored when it does not read as a recipe (from a newer version)."""
    recipe = json.loads(stored)
    try:
        return json.loads(from_dict(recipe).to_json())
    except (ConfigError, TypeError, ValueError):
        return recipe


def _recipe(run: Mapping[str, Any]) -> dict[str, Any]:
    """The stored recipe, completed to this version's fields, without its name, description and keeping
    keys, the data source by its last path component."""
    completed = _completed(json.dumps(run.get("recipe") or {}, sort_keys=True))
    recipe = {k: v for k, v in completed.items() if k not in ("name", "description")}
    for key in KEEPING_KEYS:  # how the run was kept (checkpoints) is not what it trained
        section, name = key.split(".")
        if isinstance(recipe.get(section), dict):
            recipe[section] = {k: v for k, v in recipe[section].items() if k != name}
    if "source" in (recipe.get("data") or {}):
        recipe["data"] = {**recipe["data"], "source": Path(str(recipe["data"]["source"])).name}
    return recipe


def recipe_key(run: Mapping[str, Any]) -> str:
    """``name@hash`` of the resolved recipe, the data source reduced to its last path component."""
    digest = hashlib.sha1(json.dumps(_recipe(run), sort_keys=True).encode()).hexdigest()[:6]
    return f"{run['recipe_name']}@{digest}"


def dataset_of(run: Mapping[str, Any]) -> str:
    """The dataset a run trained on: its data source's last path component (``fashion-mnist``)."""
    return str(((run.get("recipe") or {}).get("data") or {}).get("source") or "?").rstrip("/").split("/")[-1] or "?"


def _value(v: Any) -> str:
    """A recipe value as ``--set`` takes it."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return ",".join(_value(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return "-" if v is None else str(v)


def recipe_labels(runs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, str], list[str]]:
    """Readable names for the :func:`recipe_key` of each run, and notes for under a table.

    A recipe name with one configuration among ``runs`` is shown as the name; several recipes of the
    same name are shown with the values that tell them apart, as ``--set`` would give them
    (``fashion-mnist[train.epochs=3]``). Past :data:`LABEL_KEYS` values the label ends in
    ``+N more`` (with the key's hash if that is still ambiguous) and a note lists them all.
    """
    configs: dict[str, dict[str, dict[str, Any]]] = {}  # name -> key -> flat recipe
    for run in runs:
        configs.setdefault(str(run["recipe_name"]), {}).setdefault(recipe_key(run), flatten_keys(_recipe(run)))
    labels: dict[str, str] = {}
    notes: list[str] = []
    for name, by_key in configs.items():
        if len(by_key) == 1:
            labels.update(dict.fromkeys(by_key, name))
            continue
        all_keys = sorted(set().union(*by_key.values()))
        differ = [k for k in all_keys
                  if len({json.dumps(c[k], default=str) if k in c else "(absent)" for c in by_key.values()}) > 1]
        for key, flat in by_key.items():
            values = [f"{k}={_value(flat[k]) if k in flat else '(absent)'}" for k in differ]
            shown = values[:LABEL_KEYS] + ([f"+{len(values) - LABEL_KEYS} more"] if len(values) > LABEL_KEYS else [])
            labels[key] = f"{name}[{', '.join(shown)}]"
        counts = Counter(labels[k] for k in by_key)
        for key, flat in by_key.items():
            if counts[labels[key]] > 1:  # the first values agree: the hash keeps the labels apart
                labels[key] += key[len(name):]
            if len(differ) > LABEL_KEYS:
                notes.append(f"{labels[key]}: " + ", ".join(
                    f"{k}={_value(flat[k]) if k in flat else '(absent)'}" for k in differ))
    return labels, notes


def _env(key: str, default: str = "?") -> Callable[[Mapping[str, Any]], str]:
    return lambda run: str((run.get("env") or {}).get(key, default))


KEYS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "device": lambda run: str((run.get("env") or {}).get("device_name") or run.get("device") or "?"),
    "cpu": _env("cpu_model"),
    "threads": _env("threads"),
    "precision": lambda run: str((run.get("env") or {}).get("precision")
                                 or (run.get("recipe") or {}).get("train", {}).get("precision", "?")),
    "recipe": recipe_key,
    "recipe_name": lambda run: str(run["recipe_name"]),
    "target": lambda run: f"{run['target']:.4g}" if run.get("target") is not None else "?",
    "torch": _env("torch_version"),
    "code": _env("code_version"),
}


def parse_keys(text: str | Sequence[str]) -> tuple[str, ...]:
    keys = tuple(k.strip() for k in (text.split(",") if isinstance(text, str) else text) if k.strip())
    unknown = [k for k in keys if k not in KEYS]
    if unknown or not keys:
        raise ConfigError(f"unknown --by key {unknown[0] if unknown else ''!r}; valid keys: {', '.join(KEYS)}")
    return keys


def run_sample(runs: Sequence[Mapping[str, Any]]) -> Sample:
    """A Sample of stored runs: time-to-accuracy if reached, how long each ran, best accuracy."""
    return Sample.of([r["time_to_accuracy_s"] if r["outcome"] == "reached" else None for r in runs],
                     ran_s=[(r.get("summary") or {}).get("total_time_s") or r["time_to_accuracy_s"] or 0.0
                            for r in runs],
                     best_accuracy=[r["best_accuracy"] or 0.0 for r in runs])


@dataclass(frozen=True)
class Group:
    key: tuple[str, ...]
    run_ids: tuple[str, ...]
    sample: Sample
    shown: tuple[str, ...] = ()  # the key as printed: recipe keys by their labels (see recipe_labels)

    @property
    def median_s(self) -> float | None:
        return self.sample.median_s

    @property
    def names(self) -> tuple[str, ...]:
        return self.shown or self.key

    def label(self, by: Sequence[str]) -> str:
        return ", ".join(f"{k}={v}" for k, v in zip(by, self.names))

    def to_dict(self, by: Sequence[str]) -> dict[str, Any]:
        s = self.sample
        reached = [t for t in s.times if t is not None]
        return {"key": dict(zip(by, self.key)), "shown": dict(zip(by, self.names)), "label": self.label(by),
                "runs": list(self.run_ids),
                "median_time_to_accuracy_s": s.median_s, "min_time_to_accuracy_s": min(reached, default=None),
                "max_time_to_accuracy_s": max(reached, default=None), "pass_rate": s.pass_rate,
                "best_accuracy": s.median_best_accuracy}


@dataclass(frozen=True)
class Split:
    group: tuple[str, ...]
    reference: tuple[str, ...]
    total: Ratio  # t(group) / t(reference): how many times slower
    hardware: Ratio | None
    software: Ratio | None
    path_disagreement: Ratio | None
    note: str

    def to_dict(self, by: Sequence[str]) -> dict[str, Any]:
        d = lambda r: None if r is None else r.to_dict()
        return {"group": dict(zip(by, self.group)), "reference": dict(zip(by, self.reference)),
                "total": d(self.total), "hardware": d(self.hardware), "software": d(self.software),
                "path_disagreement": d(self.path_disagreement), "note": self.note}


@dataclass(frozen=True)
class Comparison:
    by: tuple[str, ...]
    groups: tuple[Group, ...]  # fastest first; groups without a median last
    splits: tuple[Split, ...]
    dataset: str | None = None  # what every compared run trained on ...
    target: float | None = None  # ... and to what accuracy
    left_out: tuple[dict[str, Any], ...] = ()  # finished runs on another dataset or target: dataset, target, runs
    notes: tuple[str, ...] = ()  # recipe labels too long for the table, in full

    def to_dict(self) -> dict[str, Any]:
        return {"by": list(self.by), "dataset": self.dataset, "target": self.target,
                "groups": [g.to_dict(self.by) for g in self.groups],
                "splits": [s.to_dict(self.by) for s in self.splits], "left_out": list(self.left_out),
                "notes": list(self.notes)}


def group_runs(runs: Sequence[Mapping[str, Any]], by: Sequence[str]) -> list[Group]:
    """Finished runs grouped by ``by``, fastest median first (unreached medians last)."""
    finished = [run for run in runs if run["outcome"] in FINISHED]
    labels = recipe_labels(finished)[0] if "recipe" in by else {}
    buckets: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for run in finished:
        buckets.setdefault(tuple(KEYS[k](run) for k in by), []).append(run)
    groups = [Group(key, tuple(r["id"] for r in rs), run_sample(rs),
                    tuple(labels.get(v, v) if k == "recipe" else v for k, v in zip(by, key)))
              for key, rs in buckets.items()]
    return sorted(groups, key=lambda g: (g.median_s is None, g.median_s or 0.0, -g.sample.pass_rate, g.key))


def group_statistics(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per recipe among ``runs`` (named by :func:`recipe_labels`), the statistics ``train --seeds``
    prints, over its finished runs: ``speedrun show GROUP_ID`` and ``runs --group``."""
    finished = [r for r in runs if r["outcome"] in FINISHED]
    labels = recipe_labels(finished)[0]
    buckets: dict[str, list[Mapping[str, Any]]] = {}
    for run in reversed(finished):  # oldest first
        buckets.setdefault(recipe_key(run), []).append(run)
    return [{"recipe": labels[key], "target": rs[0]["target"], "run_ids": [r["id"] for r in rs],
             **seed_stats([r["time_to_accuracy_s"] if r["outcome"] == "reached" else None for r in rs]).to_dict()}
            for key, rs in buckets.items()]


def like_with_like(runs: Sequence[Mapping[str, Any]], *, dataset: str | None = None, target: float | None = None
                   ) -> tuple[list[Mapping[str, Any]], str | None, float | None, list[dict[str, Any]]]:
    """The finished runs that can be compared: one dataset, one target.

    ``dataset``/``target`` pick them; otherwise the (dataset, target) with the most finished runs
    (on a tie, the one of the earliest run in ``runs``: the newest, as the store lists them). Returns
    those runs, their dataset and target, and what was left out: ``{"dataset", "target", "runs"}``
    (run ids) per other set.
    """
    sets: dict[tuple[str, float | None], list[Mapping[str, Any]]] = {}
    for run in runs:
        if run["outcome"] in FINISHED:
            sets.setdefault((dataset_of(run), run.get("target")), []).append(run)
    wanted = [k for k in sets if (dataset is None or k[0] == dataset)
              and (target is None or (k[1] is not None and abs(k[1] - target) < 1e-9))]
    if not wanted:
        return [], dataset, target, [{"dataset": d, "target": t, "runs": [r["id"] for r in rs]}
                                     for (d, t), rs in sets.items()]
    chosen = max(wanted, key=lambda k: len(sets[k]))  # max keeps the first of equals: the newest set
    left = [{"dataset": d, "target": t, "runs": [r["id"] for r in rs]} for (d, t), rs in sets.items()
            if (d, t) != chosen]
    return sets[chosen], chosen[0], chosen[1], left


def split_difference(groups: Sequence[Group], group: Group, reference: Group, *, by: Sequence[str],
                     resamples: int = RESAMPLES, seed: int = 0) -> Split:
    """Split ``t(group) / t(reference)`` into hardware and software factors (see the module docstring)."""
    hw = [i for i, k in enumerate(by) if k in HARDWARE_KEYS]
    sw = [i for i, k in enumerate(by) if k not in HARDWARE_KEYS]
    part = lambda g, idx: tuple(g.key[i] for i in idx)
    samples = {"g": group.sample, "r": reference.sample}
    kw = dict(resamples=resamples, seed=seed)
    total = ratio_of_products(samples, ["g"], ["r"], **kw)
    same_hw, same_sw = part(group, hw) == part(reference, hw), part(group, sw) == part(reference, sw)
    one = Ratio(1.0, 1.0, 1.0)
    if same_hw:
        return Split(group.key, reference.key, total, one, total, None, "same hardware: all software")
    if same_sw:
        return Split(group.key, reference.key, total, total, one, None, "same software: all hardware")

    def find(hw_of: Group, sw_of: Group) -> Group | None:
        for g in groups:
            if part(g, hw) == part(hw_of, hw) and part(g, sw) == part(sw_of, sw):
                return g
        return None

    x, y = find(reference, group), find(group, reference)  # g's software on r's hardware; r's on g's
    if x is not None:
        samples["x"] = x.sample
    if y is not None:
        samples["y"] = y.sample
    if x is not None and y is not None:
        hardware = ratio_of_products(samples, ["g", "y"], ["x", "r"], **kw).sqrt()
        software = ratio_of_products(samples, ["g", "x"], ["y", "r"], **kw).sqrt()
        disagreement = ratio_of_products(samples, ["g", "r"], ["x", "y"], **kw)
        return Split(group.key, reference.key, total, hardware, software, disagreement,
                     "both recipes on both hardware: geometric mean of the two paths")
    if x is not None:
        return Split(group.key, reference.key, total, ratio_of_products(samples, ["g"], ["x"], **kw),
                     ratio_of_products(samples, ["x"], ["r"], **kw), None,
                     "via this group's recipe on the reference hardware")
    if y is not None:
        return Split(group.key, reference.key, total, ratio_of_products(samples, ["y"], ["r"], **kw),
                     ratio_of_products(samples, ["g"], ["y"], **kw), None,
                     "via the reference recipe on this group's hardware")
    return Split(group.key, reference.key, total, None, None, None,
                 "no split: neither recipe was run on the other hardware")


def compare(runs: Sequence[Mapping[str, Any]], *, by: Sequence[str] = ("device", "precision", "recipe"),
            dataset: str | None = None, target: float | None = None, resamples: int = RESAMPLES,
            seed: int = 0) -> Comparison:
    """Group ``runs`` (stored-run dicts) and split each group's difference from the fastest.

    Only runs on one dataset to one target are compared (see :func:`like_with_like`); the others are
    listed in ``left_out``.
    """
    by = parse_keys(by)
    chosen, dataset, target, left_out = like_with_like(runs, dataset=dataset, target=target)
    groups = group_runs(chosen, by)
    splits = []
    if groups and groups[0].median_s is not None:
        reference = groups[0]
        splits = [split_difference(groups, g, reference, by=by, resamples=resamples, seed=seed)
                  for g in groups[1:]]
    notes = recipe_labels(chosen)[1] if "recipe" in by else []
    return Comparison(tuple(by), tuple(groups), tuple(splits), dataset, target, tuple(left_out), tuple(notes))


# ---------------------------------------------------------------- the command

def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def print_comparison(c: Comparison, console) -> None:
    from rich.table import Table

    on = "" if c.dataset is None else f" on {c.dataset}" + ("" if c.target is None else f" to {percent(c.target)}")
    t = Table(title=escape(f"runs{on} grouped by {', '.join(c.by)}"))
    for col in (*c.by, "runs", "pass-rate", "median time-to-accuracy", "min", "max"):
        t.add_column(col)
    for g in c.groups:
        d = g.to_dict(c.by)
        median = _fmt_s(g.median_s) if g.median_s is not None else \
            f"not reached (best {g.sample.median_best_accuracy or 0:.1%})"
        t.add_row(*map(escape, g.names), str(len(g.run_ids)), f"{g.sample.pass_rate:.0%}", median,
                  _fmt_s(d["min_time_to_accuracy_s"]), _fmt_s(d["max_time_to_accuracy_s"]))
    console.print(t)
    for note in c.notes:
        console.print(note, markup=False, highlight=False)
    for left in c.left_out:
        target = "?" if left["target"] is None else percent(left["target"])
        console.print(f"left out: {plural(len(left['runs']), 'run')} on {left['dataset']} to {target}, another "
                      f"dataset or target (compare them with --data {left['dataset']} --target {target})",
                      markup=False, highlight=False)
    if not c.splits:
        console.print("[dim]nothing to split: fewer than two groups, or no group reached its target[/]")
        return
    shown = {g.key: g.names for g in c.groups}
    s = Table(title=escape(f"slower than the fastest group ({', '.join(c.groups[0].names)}), "
                           "split into hardware x software"))
    for col in ("group", "total", "hardware", "software", "paths agree?", "how"):
        s.add_column(col)
    for sp in c.splits:
        agree = "-" if sp.path_disagreement is None else str(sp.path_disagreement)
        s.add_row(escape(", ".join(shown.get(sp.group, sp.group))), str(sp.total), str(sp.hardware or "-"),
                  str(sp.software or "-"), agree, sp.note)
    console.print(s)


def cmd_compare(args: argparse.Namespace) -> int:

    from speedrun.paths import default_store

    by = parse_keys(args.by)
    store = RunStore(args.store or default_store(), existing=True)  # reading never creates a store
    if args.runs:
        runs = [store.get_run(r) for r in args.runs]
    else:
        runs = store.list_runs(recipe=args.recipe, group=args.group, limit=None)
    if not runs:
        raise ConfigError(f"no runs to compare in {store.path}")
    result = compare(runs, by=by, dataset=args.data, target=args.target)
    if not result.groups and (args.data or args.target):
        raise ConfigError(f"no finished runs on {args.data or 'any dataset'} to "
                          f"{'any target' if args.target is None else percent(args.target)}; "
                          + "; ".join(f"{plural(len(x['runs']), 'run')} on {x['dataset']} to "
                                      f"{'?' if x['target'] is None else percent(x['target'])}"
                                      for x in result.left_out))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print_comparison(result, new_console())
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="group stored runs, split differences into hardware x software")
    p.add_argument("runs", nargs="*", metavar="RUN_ID", help="runs to compare (default: every stored run)")
    p.add_argument("--by", default="device,precision,recipe",
                   help=f"grouping keys, comma-separated (default device,precision,recipe; valid: {', '.join(KEYS)})")
    p.add_argument("--recipe", help="only runs of this recipe name")
    p.add_argument("--group", help="only runs of this group (a multi-seed train or an ablation)")
    p.add_argument("--data", metavar="NAME", help="only runs on this dataset (a built-in name, or the last part of "
                                                  "its path; default: the dataset with the most runs)")
    p.add_argument("--target", type=target_fraction, help="only runs to this target (default: the target of the "
                                                          "most runs on that dataset)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--store", help="run store (SQLite file); default $SPEEDRUN_STORE or $SPEEDRUN_HOME/runs.sqlite")
    p.set_defaults(func=cmd_compare)
    return p
