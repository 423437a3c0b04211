"""``speedrun ablate``: what each technique of a recipe buys, measured on this machine.

The plan: the full recipe, its baseline (every ablated technique off) and, per technique, the
full recipe without it (leave-one-out) and/or the baseline with only it (add-one-in); with
``pairs``, the full recipe without each pair. Variants that come out identical are run once.
Every variant trains to the same target under the same budget, ``seeds`` times.

Order: seed-major (every variant's seed 0, then every variant's seed 1, ...), and the variant order
is rotated by one at each seed, so slow drift of the machine (thermal, a neighbour's job) and the
first-run-in-process cost fall on every variant alike rather than on one.

Resumable: the plan is stored under an ablation id before the first run, and each finished run is
linked to it by (variant, seed). Running the same command again (or ``--resume ID``) continues:
runs that ended as ``reached``, ``budget_exhausted`` or ``diverged`` are kept, a run cut short (interrupted,
lost, failed) is continued from its checkpoint when it wrote one (``speedrun.train.checkpoint``), and the
rest are run.

``retune_epochs``: removing a technique should be judged at equal accuracy, not equal epochs.
For each variant, the shortest ``train.epochs`` on :data:`EPOCH_GRID` (multiples of the recipe's,
steps of 2^(1/4) ≈ 1.19×) that reaches the target on the first seed is found by bisection (assuming
a longer schedule never reaches later: at most 4 runs), then used for all seeds. A variant that
reaches at no length on the grid is measured at the longest. The search runs are stored too (role
``retune``). A variant's true shortest schedule can lie up to one grid step below the one found, so
a factor that rests on a re-tuned schedule is that coarse; the bootstrap interval covers the seeds,
not the grid (the table says so).

>>> result = ablate("fashion-mnist", seeds=5, mode="both")  # doctest: +SKIP
>>> [(e.technique, str(e.speedup)) for e in result.attribution.effects]  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from speedrun.argtypes import parse_sets, positive_int, target_fraction
from speedrun.attribution import RESAMPLES, Attribution, Sample, attribute
from speedrun.config import ConfigError, Recipe, from_dict
from speedrun.console import escape, new_console, plural
from speedrun.store import RunStore
from speedrun.techniques.registry import TECHNIQUES, Technique

MODES = ("leave-one-out", "add-one-in", "both")
EPOCH_GRID = tuple(round(2 ** (k / 4), 3) for k in range(-8, 5))  # 0.25x ... 2x the recipe's train.epochs
FINISHED = ("reached", "completed", "budget_exhausted", "diverged")  # outcomes a resumed ablation keeps
LATENCY_SAMPLES = 100  # test images timed one at a time, per variant, after its first-seed run
PLAN_VERSION = 1


class AblationInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during an ablation; ``ablation_id`` says what to resume."""

    def __init__(self, ablation_id: str) -> None:
        super().__init__(ablation_id)
        self.ablation_id = ablation_id


@dataclass(frozen=True)
class Variant:
    name: str
    disabled: tuple[str, ...]  # techniques switched off, relative to the full recipe
    recipe: Recipe


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    variant: str
    seed: int
    outcome: str
    time_to_accuracy_s: float | None
    ran_s: float  # how long the run lasted (its clock at the end)
    best_accuracy: float
    epochs: float  # epochs trained
    schedule_epochs: float  # train.epochs of the recipe it ran
    detail: str = ""


@dataclass(frozen=True)
class VariantSummary:
    name: str
    disabled: tuple[str, ...]
    schedule_epochs: float
    retune_reached: bool | None  # None: no re-tuning; False: no length on the grid reached the target
    runs: tuple[RunRecord, ...]
    median_s: float | None
    pass_rate: float
    best_accuracy: float | None  # median over seeds of each run's best accuracy
    latency_s: float | None  # median single-image inference latency, when measured

    @property
    def never_reached(self) -> bool:
        return bool(self.runs) and self.pass_rate == 0


@dataclass(frozen=True)
class AblationResult:
    ablation_id: str
    recipe_name: str
    target: float
    mode: str
    seeds: tuple[int, ...]
    variants: tuple[VariantSummary, ...]
    attribution: Attribution
    complete: bool  # every planned run finished
    retune_step: float | None = None  # ratio between neighbouring lengths of the re-tuning grid, if re-tuned

    def to_dict(self) -> dict[str, Any]:
        return {"ablation_id": self.ablation_id, "recipe": self.recipe_name, "target": self.target,
                "mode": self.mode, "seeds": list(self.seeds), "complete": self.complete,
                "variants": [{**asdict(v), "never_reached": v.never_reached} for v in self.variants],
                "attribution": self.attribution.to_dict(), "retune_step": self.retune_step}


# ---------------------------------------------------------------- the plan

def variant_name(disabled: Iterable[str], enabled: Sequence[str]) -> str:
    off = [t for t in enabled if t in set(disabled)]
    if not off:
        return "full"
    if len(off) == len(enabled):
        return "baseline"
    on = [t for t in enabled if t not in off]
    if len(off) > 1 and len(on) == 1:
        return f"+{on[0]}"
    return "".join(f"-{t}" for t in off)


def _resolve_techniques(recipe: Recipe, techniques: Mapping[str, Technique] | Iterable[str] | None
                        ) -> dict[str, Technique]:
    if techniques is None:  # process-wide techniques can't be switched off in-process: left out
        chosen = {n: t for n, t in TECHNIQUES.items() if t.enabled(recipe) and not t.process_wide}
        if not chosen:
            raise ConfigError(f"recipe {recipe.name!r} enables none of the known techniques "
                              f"({', '.join(TECHNIQUES)}); nothing to ablate")
        return chosen
    if isinstance(techniques, Mapping):
        chosen = dict(techniques)
    else:
        names = [n.strip() for n in techniques if n.strip()]
        unknown = [n for n in names if n not in TECHNIQUES]
        if unknown:
            raise ConfigError(f"unknown technique {unknown[0]!r}; known: {', '.join(TECHNIQUES)}")
        chosen = {n: TECHNIQUES[n] for n in names}
    wide = [n for n, t in chosen.items() if t.process_wide]
    if wide:
        raise ConfigError(f"technique {wide[0]!r} is process-wide: once a run turns it on it stays on, so an "
                          "in-process ablation can't measure it; compare separate `speedrun train` commands "
                          f"with and without it ({chosen[wide[0]].switch})")
    off = [n for n, t in chosen.items() if not t.enabled(recipe)]
    if off:
        on = [n for n, t in TECHNIQUES.items() if t.enabled(recipe)]
        raise ConfigError(f"technique {off[0]!r} is not enabled in recipe {recipe.name!r}; "
                          f"enabled: {', '.join(on) or 'none'}")
    if not chosen:
        raise ConfigError("no techniques to ablate")
    return chosen


def plan_variants(recipe: Recipe, *, mode: str = "leave-one-out",
                  techniques: Mapping[str, Technique] | Iterable[str] | None = None,
                  pairs: bool = False) -> list[Variant]:
    """The variants to run: full, baseline, then per technique as ``mode`` says; duplicates merged.

    ``techniques``: names from the registry (default: every one the recipe enables) or a mapping of
    Technique records.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    chosen = _resolve_techniques(recipe, techniques)
    names = list(chosen)
    sets: list[tuple[str, ...]] = [(), tuple(names)]
    if mode in ("leave-one-out", "both") or pairs:
        sets += [(t,) for t in names]
    if mode in ("add-one-in", "both"):
        sets += [tuple(n for n in names if n != t) for t in names]
    if pairs:
        sets += [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    variants, seen = [], set()
    for disabled in sets:
        key = frozenset(disabled)
        if key in seen:
            continue
        seen.add(key)
        r = recipe
        for t in names:
            if t in key:
                r = chosen[t].disable(r)
        name = variant_name(key, names)
        if name != "full":
            r = replace(r, name=f"{recipe.name}[{name}]")
        variants.append(Variant(name, tuple(t for t in names if t in key), r))
    return variants


def make_plan(recipe: Recipe, variants: list[Variant], *, techniques: list[str], mode: str, seeds: list[int],
              budget: str | float | None = None, retune_epochs: bool = False, pairs: bool = False,
              device: str = "auto", threads: int | None = None) -> dict[str, Any]:
    """The stored plan: everything needed to continue the ablation, each variant's recipe in full."""
    return {"version": PLAN_VERSION, "recipe_name": recipe.name, "target": recipe.target, "mode": mode,
            "seeds": seeds, "budget": budget, "retune_epochs": retune_epochs, "epoch_grid": list(EPOCH_GRID),
            "pairs": pairs, "techniques": techniques, "device": device, "threads": threads,
            "variants": [{"name": v.name, "disabled": list(v.disabled), "recipe": v.recipe.to_dict()}
                         for v in variants]}


def plan_key(plan: Mapping[str, Any]) -> str:
    """Identifies "the same command": equal plans give equal keys."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_order(variants: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, str]]:
    """Seed-major, the variant order rotated by one per seed.

    >>> run_order(["a", "b", "c"], [0, 1])
    [(0, 'a'), (0, 'b'), (0, 'c'), (1, 'b'), (1, 'c'), (1, 'a')]
    """
    order = []
    for i, seed in enumerate(seeds):
        k = i % len(variants) if variants else 0
        order += [(seed, v) for v in list(variants[k:]) + list(variants[:k])]
    return order


# ---------------------------------------------------------------- running

def _train(*args: Any, resume_run: str | None = None, **kwargs: Any):
    """``speedrun.train``, or the resume of ``resume_run`` (an earlier run of the same variant and seed cut
    short) from its checkpoint where it has one; a seam the tests replace to interrupt an ablation."""
    from speedrun.train.run import resume_or_train, train

    store = kwargs.get("store")
    if resume_run is None or store is None:
        return train(*args, **kwargs)
    return resume_or_train(store, resume_run, *args, **{k: v for k, v in kwargs.items() if k != "store"})


def _record(run: Mapping[str, Any]) -> RunRecord:
    """A RunRecord from a stored run joined with its ablation link."""
    s = run["summary"]
    return RunRecord(run["id"], run["variant"], run["seed"], run["outcome"], run["time_to_accuracy_s"],
                     float(s.get("total_time_s") or run["time_to_accuracy_s"] or 0.0),
                     float(run["best_accuracy"] or 0.0), float(s.get("epochs") or 0.0),
                     float(run["schedule_epochs"] or run["recipe"]["train"]["epochs"]), run["detail"] or "")


def _record_result(r, variant: str, schedule_epochs: float) -> RunRecord:
    return RunRecord(r.run_id, variant, r.seed, r.outcome, r.time_to_accuracy_s, r.total_time_s,
                     r.best_accuracy or 0.0, r.epochs, schedule_epochs, r.detail)  # not evaluated: 0, as stored


def _open(store: RunStore | str | Path | bool | None) -> RunStore | None:
    from speedrun.paths import default_store

    if store is None or store is False:
        return None
    if isinstance(store, RunStore):
        return store
    return RunStore(default_store() if store is True else store)


def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def ablate(recipe: str | Path | Recipe = "fashion-mnist", *, seeds: int = 3, seed: int = 0,
           mode: str = "leave-one-out", techniques: Mapping[str, Technique] | Iterable[str] | None = None,
           pairs: bool = False, target: float | None = None, budget: str | float | None = None,
           retune_epochs: bool = False, data: str | Path | None = None, device: str = "auto",
           threads: int | None = None, overrides: Mapping[str, Any] | None = None,
           store: RunStore | str | Path | bool | None = True, resume: str | None = None, new: bool = False,
           latency_samples: int = LATENCY_SAMPLES, resamples: int = RESAMPLES,
           progress: Callable[[str], None] | None = None) -> AblationResult:
    """Run (or continue) an ablation of ``recipe`` and attribute its speed to its techniques.

    ``resume``: an ablation id in ``store`` to continue (the other plan options are then taken
    from the stored plan). Without it, an ablation with exactly this plan already in the store is
    continued unless ``new``. Raises :class:`AblationInterrupted` on Ctrl-C, after recording.
    """
    from speedrun.train.run import Budget, resolve_recipe

    say = progress or (lambda line: None)
    run_store = _open(store)
    if resume:
        if run_store is None:
            raise ConfigError("--resume needs a run store")
        stored = run_store.get_ablation(resume)
        ablation_id, plan = stored["id"], stored["plan"]
        variants = [Variant(v["name"], tuple(v["disabled"]), from_dict(v["recipe"])) for v in plan["variants"]]
        say(f"resuming ablation {ablation_id} ({plan['recipe_name']}, {plan['mode']}, "
            f"{plural(len(plan['seeds']), 'seed')})")
    else:
        if seeds < 1:
            raise ConfigError("--seeds must be >= 1")
        values = dict(overrides or {})
        if data is not None:  # a path is made absolute so that --resume works from anywhere
            values["data.source"] = str(Path(data).resolve()) if Path(data).exists() else str(data)
        if target is not None:
            values["target"] = target
        full = resolve_recipe(recipe).override(values)
        Budget.parse(budget)  # fail before any run
        chosen = _resolve_techniques(full, techniques)
        variants = plan_variants(full, mode=mode, techniques=chosen, pairs=pairs)
        plan = make_plan(full, variants, techniques=list(chosen), mode=mode, seeds=list(range(seed, seed + seeds)),
                         budget=budget, retune_epochs=retune_epochs, pairs=pairs, device=device, threads=threads)
        key = plan_key(plan)
        existing = run_store.find_ablation(key) if run_store and not new else None
        if existing:
            ablation_id = existing["id"]
            say(f"continuing ablation {ablation_id}: the same plan is in the store (--new starts afresh)")
        else:
            ablation_id = uuid.uuid4().hex[:10]
            if run_store:
                run_store.start_ablation(ablation_id=ablation_id, recipe_name=full.name, plan=plan, plan_key=key)
    try:
        return _execute(ablation_id, plan, variants, run_store, say=say, latency_samples=latency_samples,
                        resamples=resamples)
    except AblationInterrupted:
        raise
    except KeyboardInterrupt:  # between runs: nothing half-done, the finished runs are stored
        if run_store:
            run_store.finish_ablation(ablation_id, status="interrupted", result=None)
        raise AblationInterrupted(ablation_id) from None


def _execute(ablation_id: str, plan: Mapping[str, Any], variants: list[Variant], store: RunStore | None, *,
             say: Callable[[str], None], latency_samples: int, resamples: int) -> AblationResult:
    seeds = list(plan["seeds"])
    done: dict[tuple[str, str, int, float], RunRecord] = {}  # (role, variant, seed, schedule epochs)
    unfinished: dict[tuple[str, str, int, float], str] = {}  # the same keys: a run cut short, to resume
    latency: dict[str, float] = {}
    if store:
        linked = store.ablation_runs(ablation_id)
        metrics = store.metrics([r["id"] for r in linked])
        for run in linked:  # oldest first: the latest run of a key is the one resumed
            if run["outcome"] not in FINISHED:
                epochs = float(run["schedule_epochs"] or run["recipe"]["train"]["epochs"])
                unfinished[(run["role"], run["variant"], run["seed"], epochs)] = run["id"]
            if run["outcome"] in FINISHED:
                rec = _record(run)
                done[(run["role"], rec.variant, rec.seed, rec.schedule_epochs)] = rec
                if "inference_latency_s" in metrics.get(rec.run_id, {}):
                    latency[rec.variant] = metrics[rec.run_id]["inference_latency_s"]
    by_name = {v.name: v for v in variants}
    common = dict(budget=plan["budget"], device=plan["device"], threads=plan["threads"], store=store,
                  group_id=ablation_id)
    clock = {"runs": 0, "seconds": 0.0}

    def run_one(variant: Variant, seed: int, epochs: float, role: str, label: str) -> RunRecord:
        key = (role, variant.name, seed, epochs)
        if key in done:
            return done[key]
        recipe = variant.recipe if epochs == variant.recipe.train.epochs else \
            variant.recipe.override({"train.epochs": epochs})
        start = time.perf_counter()
        r = _train(recipe, seed=seed, resume_run=unfinished.get(key), **common)
        clock["runs"] += 1
        clock["seconds"] += time.perf_counter() - start
        if store:
            store.link_ablation_run(ablation_id, run_id=r.run_id, variant=variant.name, seed=seed, role=role,
                                    epochs=epochs)
        if r.outcome == "interrupted":
            say(f"{label} interrupted (run {r.run_id})")
            if store:
                store.finish_ablation(ablation_id, status="interrupted", result=None)
            raise AblationInterrupted(ablation_id)
        rec = _record_result(r, variant.name, epochs)
        best = "not evaluated" if r.best_accuracy is None else f"{r.best_accuracy:.2%}"
        got = (f"reached in {r.time_to_accuracy_s:.1f} s" if r.reached else f"failed: {r.detail}"
               if r.outcome == "failed" else f"{r.outcome.replace('_', ' ')}, best {best}")
        say(f"{label} {got}  (run {r.run_id}, {r.epochs:.2f} epochs)")
        if role == "measure" and seed == seeds[0] and latency_samples > 0 and r.model is not None:
            lat = _measure_latency(r, recipe, latency_samples)
            if lat is not None:
                latency[variant.name] = lat
                if store:
                    store.set_metric(r.run_id, "inference_latency_s", lat)
                    store.set_metric(r.run_id, "inference_latency_samples", latency_samples)
        if rec.outcome in FINISHED:
            done[key] = rec
        return rec

    # Re-tune the schedule length per variant on the first seed.
    schedule: dict[str, float] = {v.name: v.recipe.train.epochs for v in variants}
    retune_reached: dict[str, bool | None] = {v.name: None for v in variants}
    if plan["retune_epochs"]:
        for v in variants:
            grid = [round(v.recipe.train.epochs * f, 3) for f in plan["epoch_grid"]]
            lo, hi = 0, len(grid)  # the answer is the first index that reaches, len(grid) if none
            while lo < hi:
                mid = (lo + hi) // 2
                rec = run_one(v, seeds[0], grid[mid], "retune", f"retune {v.name} {grid[mid]:g} epochs:")
                if rec.outcome == "reached":
                    hi = mid
                else:
                    lo = mid + 1
            retune_reached[v.name] = lo < len(grid)
            schedule[v.name] = grid[min(lo, len(grid) - 1)]
            say(f"retune {v.name}: train.epochs = {schedule[v.name]:g}"
                + ("" if retune_reached[v.name] else " (no length on the grid reached the target)"))

    order = run_order([v.name for v in variants], seeds)
    already = sum(("measure", v, s, schedule[v]) in done for s, v in order)
    if already:
        say(f"{already} of {len(order)} runs already in the store; {len(order) - already} to go")
    records: dict[str, list[RunRecord]] = {v.name: [] for v in variants}
    for i, (seed, name) in enumerate(order, 1):
        eta = ""
        if clock["runs"]:
            left = sum(("measure", v, s, schedule[v]) not in done for s, v in order[i - 1:])
            eta = f" eta {clock['seconds'] / clock['runs'] * left / 60:.0f} min"
        label = f"[{i}/{len(order)}{eta}] seed {seed} {name}:"
        rec = run_one(by_name[name], seed, schedule[name], "measure", label)
        if rec.outcome in FINISHED:  # a failed run (an error) is no measurement: it is retried on resume
            records[name].append(rec)

    result = summarize(ablation_id, plan, [(v.name, v.disabled) for v in variants], records, schedule=schedule,
                       retune_reached=retune_reached, latency=latency, resamples=resamples)
    if store:
        store.finish_ablation(ablation_id, status="complete" if result.complete else "incomplete",
                              result=result.to_dict())
    return result


def _measure_latency(r, recipe: Recipe, samples: int) -> float | None:
    """Median single-image inference latency of the trained model over test images (outside the clock):
    raw pixels in, the class out, normalization and the recipe's test-time views included."""
    import torch

    from speedrun import data as datalib
    from speedrun.measure.latency import inference_latency
    from speedrun.techniques.precision import autocast_for

    try:
        prepared = datalib.prepare(datalib.resolve(recipe.data.source))
        images = datalib.load_prepared(prepared.directory)
        classifier = r.classifier
        pixels = torch.as_tensor(images.test_images[:samples], device=classifier.device).float()
        autocast = autocast_for(classifier.precision, classifier.device)

        def infer(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                return classifier(x)

        return inference_latency(infer, pixels.split(1)).median_s
    except Exception:  # a latency we could not take is reported as not measured, never invented
        return None


def summarize(ablation_id: str, plan: Mapping[str, Any], variants: Sequence[tuple[str, tuple[str, ...]]],
              records: Mapping[str, Sequence[RunRecord]], *, schedule: Mapping[str, float],
              retune_reached: Mapping[str, bool | None] | None = None, latency: Mapping[str, float] | None = None,
              resamples: int = RESAMPLES) -> AblationResult:
    """The table of an ablation from its runs (any subset: an unfinished ablation summarizes too).

    ``variants``: (name, disabled techniques) in plan order; ``schedule``: train.epochs per variant.
    """
    names = list(plan["techniques"])
    samples = {v: Sample.of([r.time_to_accuracy_s if r.outcome == "reached" else None for r in records[v]],
                            ran_s=[r.ran_s for r in records[v]], best_accuracy=[r.best_accuracy for r in records[v]])
               for v, _ in variants}
    by_set = {frozenset(disabled): v for v, disabled in variants}
    full, baseline = by_set[frozenset()], by_set[frozenset(names)]
    loo = {t: by_set[frozenset([t])] for t in names if frozenset([t]) in by_set}
    aoi = {t: by_set[frozenset(n for n in names if n != t)] for t in names
           if frozenset(n for n in names if n != t) in by_set}
    mode = plan["mode"]
    # Pairs wherever the plan holds the full recipe without a, without b and without both (with
    # two techniques, "without both" is the baseline: no extra runs needed).
    pairs = {(a, b): (loo[a], loo[b], by_set[frozenset([a, b])]) for i, a in enumerate(names)
             for b in names[i + 1:] if a in loo and b in loo and frozenset([a, b]) in by_set}
    attribution = attribute(
        samples, full=full, baseline=baseline,
        leave_one_out=loo if mode in ("leave-one-out", "both") else {},
        add_one_in=aoi if mode in ("add-one-in", "both") else {}, pairs=pairs, resamples=resamples)
    summaries = tuple(VariantSummary(
        v, tuple(disabled), schedule[v], (retune_reached or {}).get(v), tuple(records[v]), samples[v].median_s,
        samples[v].pass_rate, samples[v].median_best_accuracy, (latency or {}).get(v)) for v, disabled in variants)
    complete = all(len(records[v]) == len(plan["seeds"]) for v, _ in variants)
    grid = plan.get("epoch_grid") or []
    step = (grid[-1] / grid[0]) ** (1 / (len(grid) - 1)) if plan.get("retune_epochs") and len(grid) > 1 else None
    return AblationResult(ablation_id, plan["recipe_name"], plan["target"], mode, tuple(plan["seeds"]), summaries,
                          attribution, complete, step)


def load_result(store: RunStore, ablation_id: str, *, resamples: int = RESAMPLES) -> AblationResult:
    """Summarize a stored ablation from its runs, finished or not, without running anything."""
    stored = store.get_ablation(ablation_id)
    plan = stored["plan"]
    variants = [(v["name"], tuple(v["disabled"])) for v in plan["variants"]]
    records: dict[str, list[RunRecord]] = {name: [] for name, _ in variants}
    latency: dict[str, float] = {}
    schedule = {v["name"]: float(v["recipe"]["train"]["epochs"]) for v in plan["variants"]}
    linked = [r for r in store.ablation_runs(stored["id"]) if r["role"] == "measure" and r["outcome"] in FINISHED]
    metrics = store.metrics([r["id"] for r in linked])
    latest: dict[tuple[str, int], RunRecord] = {}
    for run in linked:  # oldest first: a rerun of the same (variant, seed) replaces the earlier one
        if run["variant"] in records:
            rec = _record(run)
            latest[(rec.variant, rec.seed)] = rec
            schedule[rec.variant] = rec.schedule_epochs
            if "inference_latency_s" in metrics.get(rec.run_id, {}):
                latency[rec.variant] = metrics[rec.run_id]["inference_latency_s"]
    for (variant, _), rec in sorted(latest.items(), key=lambda kv: kv[0][1]):
        records[variant].append(rec)
    return summarize(stored["id"], plan, variants, records, schedule=schedule, latency=latency,
                     resamples=resamples)


# ---------------------------------------------------------------- the table and the command

def summary_lines(result: AblationResult) -> list[tuple[str, bool]]:
    """The lines under the tables (plain text) and whether each is flagged: the measured total, the
    product checks and pair interactions. A bound is never printed below 1 (see ``speedrun.attribution``):
    where a side never reaches the target, the line says so instead."""
    a = result.attribution
    by_name = {v.name: v for v in result.variants}
    lines: list[tuple[str, bool]] = []
    if a.total is not None:
        base = by_name.get("baseline")
        if a.total.kind == "lower_bound" and base is not None:
            best = "-" if base.best_accuracy is None else f"{base.best_accuracy:.1%}"
            bound = f": {a.total}" if a.total.value is not None and a.total.value > 1 else ""
            lines.append((f"measured total, baseline -> full: the baseline misses the target (best {best}), "
                          f"the full recipe reaches it{bound}", False))
        else:
            lines.append((f"measured total, baseline -> full: {a.total}", False))
    for p in a.products:
        missing = [e.technique for e in a.effects if e.mode == p.mode and (e.needed or e.harmful)]
        if missing or p.product.kind != "estimate" or p.product_over_total.kind != "estimate":
            why = (f"{', '.join(missing)} decide{'s' if len(missing) == 1 else ''} whether the target is reached"
                   if missing else "a factor or the total is a bound")
            lines.append((f"product of single factors ({p.mode}): not computed: {why}", False))
        else:
            lines.append((f"product of single factors ({p.mode}): {p.product}; product / total: "
                          f"{p.product_over_total}", p.flagged))
    for i in a.interactions:
        lines.append((f"interaction {i.a} x {i.b}: {i.ratio}", i.flagged))
    return lines


def print_result(result: AblationResult, console) -> None:
    from rich.table import Table

    pct = lambda v: "-" if v is None else f"{v:.1%}"
    t = Table(title=escape(f"ablation {result.ablation_id}: {result.recipe_name} to {result.target:.2%}, "
                           f"{plural(len(result.seeds), 'seed')}, {result.mode}"))
    for col in ("technique", "measured as", "median with", "median without", "speedup [95% CI]", "accuracy",
                "pass-rate with / without"):
        t.add_column(col, no_wrap=col in ("technique", "speedup [95% CI]"))
    for e in result.attribution.effects:
        acc = "-" if e.accuracy_effect is None else f"{e.accuracy_effect * 100:+.1f} pp"
        t.add_row(escape(e.technique), "full less it" if e.mode == "leave-one-out" else "baseline plus it",
                  _fmt_s(e.median_with_s) if e.median_with_s is not None else "never reached",
                  _fmt_s(e.median_without_s) if e.median_without_s is not None else "never reached",
                  escape(e.text), acc, f"{e.pass_rate_with:.0%} / {e.pass_rate_without:.0%}")
    console.print(t)
    v = Table(title="variants")
    for col in ("variant", "train.epochs", "runs", "pass-rate", "median time-to-accuracy", "best accuracy",
                "latency (1 image)"):
        v.add_column(col, no_wrap=col == "variant")
    for s in result.variants:
        median = _fmt_s(s.median_s) if s.median_s is not None else (
            f"never reached (best {pct(s.best_accuracy)})" if s.never_reached else
            "not yet run" if not s.runs else f"not reached in most runs (best {pct(s.best_accuracy)})")
        epochs = f"{s.schedule_epochs:g}" + (" (none reached)" if s.retune_reached is False else "")
        v.add_row(escape(s.name), epochs, str(len(s.runs)), f"{s.pass_rate:.0%}", median, pct(s.best_accuracy),
                  "not measured" if s.latency_s is None else f"{s.latency_s * 1e3:.2f} ms")
    console.print(v)
    if result.retune_step:
        console.print(f"train.epochs re-tuned on seed {result.seeds[0]} in steps of {result.retune_step:.3g}x: "
                      "a variant's shortest schedule may lie up to one step below the one found, and the "
                      "intervals cover the seeds, not that step", highlight=False)
    for line, flagged in summary_lines(result):
        note = "  [bold yellow]not multiplicative[/]" if flagged else ""
        console.print(escape(line) + note, highlight=False)
    if not result.complete:
        console.print(f"[yellow]incomplete[/]: continue with speedrun ablate --resume {result.ablation_id}")


def cmd_ablate(args: argparse.Namespace) -> int:
    out, err = new_console(), new_console(stderr=True)
    from speedrun.paths import default_store

    store = RunStore(args.store or default_store())
    techniques = args.techniques.split(",") if args.techniques else None
    say = (lambda line: err.print(f"[dim]{escape(line)}[/]", highlight=False)) if args.json else \
        (lambda line: out.print(line, markup=False, highlight=False))
    try:
        result = ablate(args.recipe, seeds=args.seeds, seed=args.seed, mode=args.mode, techniques=techniques,
                        pairs=args.pairs, target=args.target, budget=args.budget, retune_epochs=args.retune_epochs,
                        data=args.data, device=args.device, threads=args.threads, overrides=parse_sets(args.set),
                        store=store, resume=args.resume, new=args.new, progress=say)
    except AblationInterrupted as e:
        err.print(f"speedrun: ablation {e.ablation_id} interrupted; continue it with "
                  f"speedrun ablate --resume {e.ablation_id}", highlight=False)
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), default=str))
    else:
        print_result(result, out)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ablate", help="measure what each technique of a recipe buys, over seeds")
    p.add_argument("--recipe", default="fashion-mnist", help="built-in recipe name or a .toml file")
    p.add_argument("--mode", default="leave-one-out", choices=MODES,
                   help="leave-one-out: full recipe minus each technique; add-one-in: baseline plus each; both")
    p.add_argument("--techniques", help="comma-separated techniques to ablate (default: all the recipe enables)")
    p.add_argument("--pairs", action="store_true", help="also run the full recipe without each pair, to flag "
                                                        "effects that do not multiply")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per variant (default 3; 5+ for "
                                                                   "tight intervals)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--target", type=target_fraction, help="held-out accuracy to reach, in (0, 1] or as 92%%")
    p.add_argument("--budget", help="give up on a run after this long: seconds (90, 2m) or epochs (3ep)")
    p.add_argument("--retune-epochs", action="store_true",
                   help="per variant, use the shortest train.epochs that reaches the target on the first seed")
    p.add_argument("--data", help="dataset: a built-in name or a path (default: the recipe's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--resume", metavar="ID", help="continue a stored ablation (the other plan options are "
                                                  "taken from it)")
    p.add_argument("--new", action="store_true", help="start a new ablation even if the same plan is stored")
    p.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    p.add_argument("--store", help="run store (SQLite file); default $SPEEDRUN_STORE or $SPEEDRUN_HOME/runs.sqlite")
    p.set_defaults(func=cmd_ablate)
    return p
