"""``speedrun tune``: search a recipe's hyperparameters for the shortest time to a validation target.

Three phases, each resumable by running the same command again:

1. **Search.** Optuna (TPE by default) proposes values of the search space; each trial trains the
   recipe with them on seed = its trial number, judged on the validation split (``data.val_frac``,
   ``eval.split=val``; the test split is not read), and scores its time-to-target or a penalty
   (``speedrun.tune.objective``). The first trial of a new study is the recipe itself. Running
   trials are pruned by the time-to-accuracy rule. ``--workers N`` runs N local processes on the
   study; other machines may join with the same command and ``--storage postgresql://...``.
2. **Confirmation.** The best ``confirm_top`` distinct trials that reached the target are re-run
   on ``confirm_seeds`` fresh seeds (10000, 10001, ...: never a search seed), still on validation.
   The winner is the one with the lowest median time among those that passed on every seed: a
   trial that won by a lucky draw falls here. When none passes, the search's fastest hits were
   luck at their margin, so the next round (up to ``confirm_rounds``) takes the fastest trials
   whose search accuracy beat every failed candidate's; when still none passes, the recipe itself
   (trial #0) is confirmed last, so the study names the fastest recipe that held up.
3. **Test.** The winner is trained once on the test seed (20000) and judged on the test split
   (the only time a study reads it), and written as a TOML recipe that ``speedrun train --recipe``
   runs unchanged (judged on test, with the same validation hold-out).

Every trial, confirmation and test run is a run in the run store, grouped under the study's name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from speedrun.config import ConfigError, Recipe, flatten_keys
from speedrun.store import RunStore, StoreError
from speedrun.tune import objective as obj
from speedrun.tune import space as spaces
from speedrun.tune import storage as stores

CONFIRM_SEED0, TEST_SEED = 10_000, 20_000
SAMPLERS = ("tpe", "random")
IDENTITY_KEYS = ("recipe", "target", "val_frac", "space", "data")


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a study: everything finished is stored; the same command resumes."""

    def __init__(self, study: str) -> None:
        super().__init__(study)
        self.study = study


@dataclass(frozen=True)
class Confirmation:
    trial: int
    seeds: tuple[int, ...]
    times: tuple[float | None, ...]  # validation time-to-target per seed, None where missed
    run_ids: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return bool(self.times) and all(t is not None for t in self.times)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times) if self.passed else None


@dataclass(frozen=True)
class TuneResult:
    study: str
    storage: str
    recipe_name: str
    target: float
    trials: dict[str, int]  # finished trials by outcome
    best_trial: int | None  # the declared winner (after confirmation), None when none passed
    params: dict[str, Any]
    recipe: Recipe | None  # the winner's recipe as written (judged on test)
    confirmations: tuple[Confirmation, ...]
    test: dict[str, Any] | None  # the single test measurement
    out: Path | None
    search_s: float  # this command's wall time in each phase
    confirm_s: float
    overhead: dict[str, float] = field(default_factory=dict)
    recipe_trial: int | None = None  # the trial that ran the recipe's own values, when it reached the target

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recipe"] = None if self.recipe is None else self.recipe.to_dict()
        d["out"] = None if self.out is None else str(self.out)
        d["confirmations"] = [{**dataclasses.asdict(c), "passed": c.passed, "median_s": c.median_s}
                              for c in self.confirmations]
        return d


@dataclass(frozen=True)
class Plan:
    """Everything a study's processes share: the checked command."""

    base: Recipe  # the recipe searched, judged on validation
    base_name: str  # the built-in recipe the TOML output is based on
    space: tuple[spaces.Param, ...]
    study: str
    storage_url: str | None
    trials: int | None
    time_budget_s: float | None
    trial_budget_s: float | None
    workers: int
    sampler: str
    sampler_seed: int
    prune: bool
    rule: obj.PruneRule
    confirm_top: int
    confirm_seeds: int
    confirm_rounds: int
    test_target: float | None  # the target the written recipe (and the one test read) is judged at
    out: Path
    device: str
    threads: int | None
    store: str | None

    def identity(self) -> dict[str, Any]:
        """What makes two commands the same study: resuming with another one is refused."""
        recipe = {k: v for k, v in self.base.to_dict().items() if k not in ("name", "description")}
        return json.loads(json.dumps({"recipe": recipe, "target": self.base.target, "val_frac": self.base.data.val_frac,
                "space": spaces.space_to_dict(self.space), "data": self.base.data.source,
                "recipe_name": self.base_name}))  # as stored: tuples read back as lists


def default_study_name(recipe: Recipe) -> str:
    return f"{recipe.name}-target{recipe.target * 100:g}"


def make_plan(recipe: str | Path | Recipe = "fashion-mnist", *, data: str | Path | None = None,
              target: float | None = None, trials: int | None = None, time_budget: str | float | None = None,
              space: str | Path | Sequence[spaces.Param] | None = None, storage: str | None = None,
              study: str | None = None, workers: int = 1, val_frac: float = 0.1, sampler: str = "tpe",
              sampler_seed: int = 0, prune: bool = True, prune_slack: float = 1.25, prune_margin: float = 0.01,
              trial_budget: str | float | None = None, confirm_top: int = 3, confirm_seeds: int = 3,
              confirm_rounds: int = 3, test_target: float | None = None, out: str | Path | None = None, device: str = "auto", threads: int | None = None,
              store: str | None = None, overrides: Mapping[str, Any] | None = None) -> Plan:
    """Check the command before anything is written; ConfigError (one line) for what cannot run."""
    from speedrun.recipes import RECIPES
    from speedrun.train.run import Budget, resolve_recipe

    if trials is None and time_budget is None:
        raise ConfigError("give --trials N or --time-budget (e.g. 30m): how long to search")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials must be >= 1; got {trials}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1; got {workers}")
    if confirm_top < 1 or confirm_seeds < 1 or confirm_rounds < 1:
        raise ConfigError("--confirm-top, --confirm-seeds and --confirm-rounds must be >= 1")
    if test_target is not None and not 0 < test_target <= 1:
        raise ConfigError(f"--test-target must be in (0, 1]; got {test_target}")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; use one of {', '.join(SAMPLERS)}")
    if not 0 < val_frac <= 0.5:
        raise ConfigError(f"--val-frac must be in (0, 0.5]; got {val_frac}")
    budget_s = _seconds(time_budget, "--time-budget")
    trial_s = _seconds(trial_budget, "--trial-budget")
    if trial_s is not None and trial_s > obj.MAX_TRIAL_BUDGET_S:
        raise ConfigError(f"--trial-budget must be at most {obj.MAX_TRIAL_BUDGET_S:g} s (every miss must "
                          "score after every hit)")
    rule = obj.PruneRule(slack=prune_slack, margin=prune_margin)
    Budget.parse(trial_budget)
    values = dict(overrides or {})
    if data is not None:  # absolute, so workers and resumes started elsewhere read the same data
        values["data.source"] = str(Path(data).resolve()) if Path(data).exists() else str(data)
    if target is not None:
        values["target"] = target
    values.update({"data.val_frac": val_frac, "eval.split": "val"})
    resolved = resolve_recipe(recipe)
    base = resolved.override(values)
    if isinstance(recipe, Recipe):
        base_name = recipe.name if recipe.name in RECIPES else "fashion-mnist"
    elif str(recipe).endswith(".toml"):
        from speedrun.config import read_toml

        base_name = str(read_toml(recipe).get("base", "fashion-mnist"))
    else:
        base_name = str(recipe)
    if space is None:
        found = spaces.default_space(base)
    elif isinstance(space, (str, Path)):
        found = spaces.load_space(space, base)
    else:
        found = tuple(space)
    spaces.check_space(base, found)
    name = study or default_study_name(base)
    if not name.strip() or any(c in name for c in "/\\\n"):
        raise ConfigError(f"--study {name!r}: use a plain name (letters, digits, - _ . @)")
    out_path = Path(out) if out is not None else Path.cwd() / f"{name}.toml"
    if out_path.is_dir():
        raise ConfigError(f"--out {out_path} is a folder; give a file such as {out_path / 'best.toml'}")
    if not out_path.parent.is_dir() or not os.access(out_path.parent, os.W_OK):
        raise ConfigError(f"--out {out_path}: cannot write in {out_path.parent}")
    return Plan(base, base_name, found, name, storage, trials, budget_s, trial_s, workers, sampler, sampler_seed,
                prune, rule, confirm_top, confirm_seeds, confirm_rounds, test_target, out_path, device, threads, store)


def _seconds(text: str | float | None, flag: str) -> float | None:
    from speedrun.train.run import Budget

    if text is None:
        return None
    budget = Budget.parse(text)
    if budget.seconds is None:
        raise ConfigError(f"{flag} is wall-clock time (90s, 30m, 2h), not epochs; got {text!r}")
    return budget.seconds


# ---------------------------------------------------------------- the study

def open_study(plan: Plan, storage, *, worker: int = 0):
    """Create the study, or load it after checking it is this command's; the sampler and pruner of
    this process (each worker seeds its sampler apart, so workers propose different trials)."""
    import optuna

    sampler = (optuna.samplers.TPESampler(seed=plan.sampler_seed + worker, constant_liar=True)
               if plan.sampler == "tpe" else optuna.samplers.RandomSampler(seed=plan.sampler_seed + worker))
    pruner = obj.TimeToAccuracyPruner(plan.rule) if plan.prune else optuna.pruners.NopPruner()
    identity = plan.identity()
    if plan.study in optuna.study.get_all_study_names(storage):
        study = optuna.load_study(study_name=plan.study, storage=storage, sampler=sampler, pruner=pruner)
        for _ in range(50):  # a worker on another machine may have created it a moment ago
            if "identity" in study.user_attrs:
                break
            time.sleep(0.1)
        check_identity(plan.study, study.user_attrs.get("identity") or {}, identity)
        return study
    study = optuna.create_study(study_name=plan.study, storage=storage, sampler=sampler, pruner=pruner,
                                direction="minimize", load_if_exists=True)
    if "identity" not in study.user_attrs:  # another worker may have created it first
        study.set_user_attr("identity", identity)
        study.set_user_attr("created_at", time.time())
        start = spaces.recipe_values(plan.base, plan.space)
        if spaces.in_space(start, plan.base, plan.space):
            study.enqueue_trial(start, user_attrs={"note": "the recipe itself"})
    else:
        check_identity(plan.study, study.user_attrs["identity"], identity)
    return study


def check_identity(name: str, stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> None:
    """Refuse to resume a study with another recipe, target, hold-out, data or space."""
    labels = {"recipe_name": "recipe", "recipe": "recipe setting", "val_frac": "validation fraction",
              "data": "dataset", "space": "search space"}
    for key in ("recipe_name", "target", "val_frac", "data", "recipe", "space"):
        old, new = stored.get(key), wanted.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):  # name the first setting that differs
            a, b = flatten_keys(old), flatten_keys(new)
            key_diff = next(k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))
            what, shown_old, shown_new = f"{labels[key]} {key_diff}", a.get(key_diff, "-"), b.get(key_diff, "-")
        elif key == "target":
            what, shown_old, shown_new = "target", f"{old:.2%}", f"{new:.2%}"
        else:
            what, shown_old, shown_new = labels.get(key, key), old, new
        raise ConfigError(f"study {name!r} exists with another {what} ({shown_old}, not {shown_new}); "
                          "choose another --study name, or repeat its command")


def _finished_states():
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)


def counts(study) -> dict[str, int]:
    """Trials by outcome (surplus trials, discarded before running, left out)."""
    found: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("outcome") == "surplus" or t.state.name == "WAITING":
            continue
        key = t.user_attrs.get("outcome") or t.state.name.lower()
        found[key] = found.get(key, 0) + 1
    return found


def _reserve_s(plan: Plan, study) -> float:
    """Time kept back from the search for the confirmation and test runs of a time-budgeted study."""
    hits = sorted(t.value for t in study.get_trials(deepcopy=False, states=_finished_states()[:1])
                  if obj.is_hit(t.value))
    walls = [t.user_attrs["wall_s"] for t in study.get_trials(deepcopy=False, states=_finished_states())
             if "wall_s" in t.user_attrs]
    per_run = statistics.median(hits[:plan.confirm_top]) * 1.15 if hits else (
        statistics.median(walls) if walls else 0.0)
    return per_run * (plan.confirm_top * plan.confirm_seeds + 1)


def _train(*args: Any, **kwargs: Any):
    """``speedrun.train``; a seam the tests replace."""
    from speedrun.train.run import train

    return train(*args, **kwargs)


def params_line(params: Mapping[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in params.items())


def search(plan: Plan, storage, *, worker: int = 0, deadline: float | None = None,
           say: Callable[[str], None] = print, run_store: RunStore | None = None) -> int:
    """Run trials until the study has ``plan.trials`` finished (or running) or the search time is up;
    the number of trials this process ran."""
    from optuna.trial import TrialState

    study = open_study(plan, storage, worker=worker)
    ran = 0
    while True:
        for number in stores.fail_dead_trials(study, storage):
            say(f"trial #{number}: its worker is gone; failed (it will be run again)")
        trials = study.get_trials(deepcopy=False)
        active = [t for t in trials if t.state in (*_finished_states(), TrialState.RUNNING)
                  and t.user_attrs.get("outcome") != "surplus"]
        if plan.trials is not None and len(active) >= plan.trials:
            break
        search_deadline = None
        if deadline is not None:
            search_deadline = deadline - _reserve_s(plan, study)
            walls = [t.user_attrs["wall_s"] for t in trials if "wall_s" in t.user_attrs]
            expected = statistics.median(walls) * 0.5 if walls else 0.0  # pruning cuts a typical trial short
            if time.time() + expected > search_deadline:
                break
        asked_at = time.perf_counter()
        trial = study.ask()
        trial.set_user_attr("worker", obj.worker_id())
        trial.set_user_attr("alive_at", time.time())
        if plan.trials is not None:  # another worker may have started the last one at the same moment
            earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number
                       and t.state in (*_finished_states(), TrialState.RUNNING)
                       and t.user_attrs.get("outcome") != "surplus"]
            if len(earlier) >= plan.trials:
                trial.set_user_attr("outcome", "surplus")
                study.tell(trial, state=TrialState.FAIL)
                break
        run_trial(plan, study, trial, search_deadline=search_deadline, say=say, run_store=run_store,
                  asked_at=asked_at)
        ran += 1
    return ran


def run_trial(plan: Plan, study, trial, *, search_deadline: float | None, say: Callable[[str], None],
              run_store: RunStore | None, asked_at: float | None = None) -> None:
    """Train one trial, record it in the study and the run store, print its line. ``asked_at``:
    when the trial was asked for (perf_counter), so the sampler's time counts in its overhead."""
    from optuna.trial import TrialState

    started = time.perf_counter() if asked_at is None else asked_at
    params = {p.key: trial.suggest_categorical(p.key, list(p.choices)) if p.choices else
              _suggest(trial, p, plan.base) for p in plan.space}
    ask_s = time.perf_counter() - started
    hook = obj.TrialHook(trial, study.pruner if plan.prune else None, recipe=plan.base,
                         search_deadline=search_deadline)
    try:
        recipe = plan.base.override({**params, "name": f"{plan.study}#{trial.number}"})
        hook.recipe = recipe
        r = _train(recipe, seed=trial.number, budget=plan.trial_budget_s, device=plan.device,
                   threads=plan.threads, store=run_store if run_store is not None else False,
                   group_id=plan.study, hooks=[hook], read_test=False)
    except ConfigError as e:  # values that cannot run together (a batch larger than the set): scored last
        _tell(study, trial, TrialState.COMPLETE, obj.WORST_S, outcome="failed", detail=str(e), started=started)
        say(f"#{trial.number:<3} failed     {e}  | {params_line(params)}")
        return
    attrs = dict(run_id=r.run_id, outcome=r.outcome, detail=r.detail, time_s=r.time_to_accuracy_s,
                 best_accuracy=r.best_accuracy if r.curve else None, total_time_s=r.total_time_s,
                 seed=trial.number, hook_s=hook.overhead_s, ask_s=ask_s,
                 train_call_s=time.perf_counter() - started - ask_s)
    if run_store is not None:
        _mark_run(run_store, r.run_id, trial=trial.number)
    if r.outcome == "interrupted":
        _tell(study, trial, TrialState.FAIL, None, started=started, **attrs)
        raise TuneInterrupted(plan.study)
    if r.outcome == "pruned":
        _tell(study, trial, TrialState.PRUNED, None, started=started, **attrs)
    else:
        value = obj.objective_value(r.outcome, time_s=r.time_to_accuracy_s, best_accuracy=r.best_accuracy,
                                    target=plan.base.target)
        _tell(study, trial, TrialState.COMPLETE, value, started=started, **attrs)
    best = obj.best_finished(study)
    best_acc = f"best {r.best_accuracy:.2%}" if r.curve else "before its first evaluation"
    got = (f"reached   {r.time_to_accuracy_s:6.1f} s" if r.reached else
           f"{r.outcome.replace('_', ' '):<9} {r.total_time_s:6.1f} s, {best_acc}")
    why = f" ({r.detail})" if r.outcome in ("pruned", "failed", "diverged") else ""
    lead = "" if best is None else f"best #{best.number} {best.value:.1f} s"
    say(f"#{trial.number:<3} {got}{why}  | {lead}  | {params_line(params)}")


def _suggest(trial, p: spaces.Param, recipe: Recipe) -> Any:
    dist = p.distribution(recipe)
    import optuna.distributions as d

    if isinstance(dist, d.IntDistribution):
        return trial.suggest_int(p.key, dist.low, dist.high, log=dist.log, step=dist.step)
    return trial.suggest_float(p.key, dist.low, dist.high, log=dist.log, step=dist.step)


def _tell(study, trial, state, value: float | None, *, started: float, **attrs: Any) -> None:
    for key, v in attrs.items():
        trial.set_user_attr(key, v)
    trial.set_user_attr("wall_s", time.perf_counter() - started)
    t0 = time.perf_counter()
    study.tell(trial, value if value is not None else None, state=state)
    study.set_user_attr(f"tell_s:{trial.number}", time.perf_counter() - t0)


def _mark_run(run_store: RunStore, run_id: str, *, trial: int | None = None, role: float = 0.0) -> None:
    """Tag a stored run as a study's (role 0: search trial, 1: confirmation, 2: test), for `report`."""
    try:
        if trial is not None:
            run_store.set_metric(run_id, "tune_trial", trial)
        run_store.set_metric(run_id, "tune_role", role)
    except StoreError:
        pass


# ---------------------------------------------------------------- workers

def spawn_workers(plan: Plan, *, deadline: float | None, say: Callable[[str], None]) -> list[int]:
    """Start ``plan.workers`` processes on the study, wait for them; their exit codes."""
    import tempfile

    threads = plan.threads or max(1, (os.cpu_count() or 1) // plan.workers)
    fd, path = tempfile.mkstemp(prefix="speedrun-tune-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(plan_to_json(dataclasses.replace(plan, threads=threads)), f)
    procs = []
    try:
        for w in range(plan.workers):
            cmd = [sys.executable, "-m", "speedrun.tune.worker", path, str(w),
                   "" if deadline is None else repr(deadline), repr(time.time())]
            procs.append(subprocess.Popen(cmd))
        say(f"{plan.workers} workers started (pids {', '.join(str(p.pid) for p in procs)}), "
            f"{threads} thread(s) each")
        codes = []
        for p in procs:
            codes.append(p.wait())
        return codes
    except KeyboardInterrupt:  # the workers got the same Ctrl-C (one process group): let them record it
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        raise TuneInterrupted(plan.study) from None
    finally:
        Path(path).unlink(missing_ok=True)


def plan_to_json(plan: Plan) -> dict[str, Any]:
    """The plan as JSON, for worker processes: exact, with nothing parsed again."""
    d = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    d["base"] = plan.base.to_dict()
    d["space"] = [dataclasses.asdict(p) for p in plan.space]
    d["rule"] = dataclasses.asdict(plan.rule)
    d["out"] = str(plan.out)
    return d


def plan_from_json(d: Mapping[str, Any]) -> Plan:
    from speedrun.config import from_dict

    values = {f.name: d[f.name] for f in dataclasses.fields(Plan)}
    values["base"] = from_dict(d["base"])
    values["space"] = tuple(spaces.Param(**{**p, "choices": tuple(p["choices"])}) for p in d["space"])
    values["rule"] = obj.PruneRule(**d["rule"])
    values["out"] = Path(d["out"])
    return Plan(**values)


# ---------------------------------------------------------------- confirmation and test

def candidates(study, top: int, *, exclude: frozenset[int] = frozenset(), above: float | None = None) -> list:
    """The best ``top`` finished trials that reached the target, distinct in their values, leaving out
    the trials ``exclude`` names and, with ``above``, those whose search accuracy did not beat it."""
    from optuna.trial import TrialState

    hits = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if obj.is_hit(t.value)),
                  key=lambda t: t.value)
    chosen, seen = [], set()
    for t in hits:
        key = tuple(sorted((k, repr(v)) for k, v in t.params.items()))
        accuracy = t.user_attrs.get("best_accuracy")
        if key in seen or t.number in exclude or (above is not None and (accuracy is None or accuracy <= above)):
            continue
        seen.add(key)
        chosen.append(t)
        if len(chosen) == top:
            break
    return chosen


def recipe_itself(study):
    """Trial #0 as the study enqueued it (the recipe's own values), when it reached the target."""
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("note") == "the recipe itself":
            return t if t.state.name == "COMPLETE" and obj.is_hit(t.value) else None
    return None


def confirm(plan: Plan, study, *, say: Callable[[str], None], run_store: RunStore | None) -> list[Confirmation]:
    """Confirm candidates in rounds until one passes on every fresh seed (the module docstring's
    rule); stored runs are reused on resume, so a resumed study takes the same rounds."""
    found: list[Confirmation] = []
    tried: set[int] = set()
    above = None
    for round_ in range(plan.confirm_rounds):
        batch = candidates(study, plan.confirm_top, exclude=frozenset(tried), above=above)
        if not batch:
            break
        if round_:
            say(f"none passed on every seed; round {round_ + 1}: the fastest trials whose search accuracy beat "
                f"{above:.2%} (the best of those that failed): {', '.join(f'#{t.number}' for t in batch)}")
        for t in batch:
            found.append(confirm_trial(plan, study, t, say=say, run_store=run_store))
            tried.add(t.number)
        if any(c.passed for c in found):
            return found
        above = max(study.trials[c.trial].user_attrs.get("best_accuracy") or 0.0 for c in found)
    itself = recipe_itself(study)
    if itself is not None and itself.number not in tried:
        say(f"no faster candidate passed on every seed: confirming the recipe itself (#{itself.number})")
        found.append(confirm_trial(plan, study, itself, say=say, run_store=run_store))
    return found


def confirm_trial(plan: Plan, study, t, *, say: Callable[[str], None], run_store: RunStore | None) -> Confirmation:
    """Re-run trial ``t``'s values on the fresh seeds, on validation (a stored run is reused)."""
    times, run_ids = [], []
    seeds = tuple(CONFIRM_SEED0 + i for i in range(plan.confirm_seeds))
    recipe = plan.base.override({**t.params, "name": f"{plan.study}#{t.number}"})
    for seed in seeds:
        key = f"confirm:{t.number}:{seed}"
        done = study.user_attrs.get(key)
        if done is None:
            r = _train(recipe, seed=seed, budget=plan.trial_budget_s, device=plan.device, threads=plan.threads,
                       store=run_store if run_store is not None else False, group_id=plan.study, read_test=False)
            if r.outcome == "interrupted":
                raise TuneInterrupted(plan.study)
            done = {"run_id": r.run_id, "outcome": r.outcome, "time_s": r.time_to_accuracy_s,
                    "best_accuracy": r.best_accuracy}
            study.set_user_attr(key, done)
            if run_store is not None:
                _mark_run(run_store, r.run_id, trial=t.number, role=1.0)
            got = (f"reached {r.time_to_accuracy_s:.1f} s" if r.reached else
                   f"{r.outcome.replace('_', ' ')}, best {r.best_accuracy:.2%}")
            say(f"confirm #{t.number} (search {t.value:.1f} s) seed {seed}: {got}")
        times.append(done["time_s"] if done["outcome"] == "reached" else None)
        run_ids.append(done["run_id"])
    return Confirmation(t.number, seeds, tuple(times), tuple(run_ids))


def winner(confirmations: Sequence[Confirmation]) -> Confirmation | None:
    passed = [c for c in confirmations if c.passed]
    return min(passed, key=lambda c: c.median_s, default=None)


def measure_test(plan: Plan, study, trial_number: int, recipe: Recipe, *, say: Callable[[str], None],
                 run_store: RunStore | None) -> dict[str, Any]:
    """The study's single look at the test split: the winner, once, on the test seed."""
    done = study.user_attrs.get("test")
    if done is not None and done.get("trial") == trial_number:
        return done
    r = _train(recipe, seed=TEST_SEED, budget=plan.trial_budget_s, device=plan.device, threads=plan.threads,
               store=run_store if run_store is not None else False, group_id=plan.study)
    if r.outcome == "interrupted":
        raise TuneInterrupted(plan.study)
    done = {"trial": trial_number, "seed": TEST_SEED, "run_id": r.run_id, "outcome": r.outcome,
            "time_s": r.time_to_accuracy_s, "test_accuracy": r.test_accuracy, "val_accuracy": r.val_accuracy,
            "best_accuracy": r.best_accuracy}
    study.set_user_attr("test", done)
    if run_store is not None:
        _mark_run(run_store, r.run_id, trial=trial_number, role=2.0)
    got = (f"reached {r.time_to_accuracy_s:.1f} s" if r.reached else
           f"{r.outcome.replace('_', ' ')}, best {r.best_accuracy:.2%}")
    say(f"test #{trial_number} seed {TEST_SEED} (judged on the test split): {got}")
    return done


def final_recipe(plan: Plan, trial) -> Recipe:
    """The winner as the TOML states it: judged on the test split (at ``plan.test_target`` when given,
    else the study's target), with the search's hold-out."""
    judged = {"eval.split": "test", **({} if plan.test_target is None else {"target": plan.test_target})}
    return plan.base.override({**trial.params, **judged})


def write_recipe(plan: Plan, recipe: Recipe, *, description: str) -> Path:
    """Write ``recipe`` as TOML to ``plan.out`` and read it back: it must load as the same recipe."""
    from speedrun.recipes import dump_toml, load_toml

    recipe = dataclasses.replace(recipe, description=description)
    text = dump_toml(recipe, base=plan.base_name, header=[f"Written by speedrun tune (study {plan.study})."])
    tmp = plan.out.with_name(f".{plan.out.name}.tmp")
    tmp.write_text(text)
    loaded = load_toml(tmp)
    if dataclasses.replace(loaded, name=recipe.name) != recipe:
        tmp.unlink(missing_ok=True)
        raise RuntimeError("the TOML written does not load back as the tuned recipe (a bug: please report it)")
    tmp.replace(plan.out)
    return plan.out


# ---------------------------------------------------------------- the command

def tune(recipe: str | Path | Recipe = "fashion-mnist", *, say: Callable[[str], None] = print,
         **options: Any) -> TuneResult:
    """Search, confirm, test and write the best recipe (module docstring); the options are
    ``make_plan``'s. Resumes the study of the same name when it exists.

    >>> result = tune("fashion-mnist", time_budget="30m", workers=2)  # doctest: +SKIP
    >>> result.out, result.test["time_s"]  # doctest: +SKIP
    """
    plan = make_plan(recipe, **options)
    return run_plan(plan, say=say)


def run_plan(plan: Plan, *, say: Callable[[str], None] = print) -> TuneResult:
    from speedrun.paths import default_store

    start = time.time()
    deadline = start + plan.time_budget_s if plan.time_budget_s is not None else None
    storage = stores.open_storage(plan.storage_url)
    study = open_study(plan, storage)  # checks the study is this command's before anything runs
    run_store = RunStore(plan.store or default_store())
    before = counts(study)
    if sum(before.values()):
        say(f"study {plan.study}: resuming ({_counts_text(before)}) in {stores.describe(plan.storage_url)}")
    else:
        say(f"study {plan.study}: {plan.base.name} to {plan.base.target:.2%} on a {plan.base.data.val_frac:.0%} "
            f"validation split, {len(plan.space)} parameters, in {stores.describe(plan.storage_url)}")
    try:
        if plan.workers > 1:
            codes = spawn_workers(plan, deadline=deadline, say=say)
            if any(c not in (0,) for c in codes):
                say(f"worker exit codes {codes}: finishing the search here")
        search(plan, storage, deadline=deadline, say=say, run_store=run_store)  # completes what workers left
        search_s = time.time() - start
        confirm_start = time.time()
        confirmations = confirm(plan, study, say=say, run_store=run_store)
        best = winner(confirmations)
        test = out = final = None
        params: dict[str, Any] = {}
        if best is not None:
            trial = study.trials[best.trial]
            params = dict(trial.params)
            final = final_recipe(plan, trial)
            test = measure_test(plan, study, best.trial, final.override({"name": f"{plan.study}#{best.trial}"}),
                                say=say, run_store=run_store)
            out = write_recipe(plan, final, description=describe_choice(plan, study, best, test))
    except TuneInterrupted:
        raise
    except KeyboardInterrupt:
        raise TuneInterrupted(plan.study) from None
    return TuneResult(plan.study, stores.describe(plan.storage_url), plan.base.name, plan.base.target, counts(study),
                      None if best is None else best.trial, params, final, tuple(confirmations), test, out,
                      search_s, time.time() - confirm_start, overhead(study),
                      None if recipe_itself(study) is None else recipe_itself(study).number)


def describe_choice(plan: Plan, study, best: Confirmation, test: Mapping[str, Any]) -> str:
    n = sum(counts(study).get(k, 0) for k in ("reached", "budget_exhausted", "pruned", "diverged", "failed"))
    t = "-" if test.get("time_s") is None else f"{test['time_s']:.1f} s"
    seeds = f"seed {best.seeds[0]}" if len(best.seeds) == 1 else f"seeds {best.seeds[0]}-{best.seeds[-1]}"
    held_out = f"a {plan.base.data.val_frac:.0%} validation hold-out of the training split"
    tested = f"the test split was read once, seed {test['seed']}: {test['outcome']} {t}"
    itself = recipe_itself(study)
    if itself is not None and itself.number == best.trial:
        return (f"{plan.base_name}'s own values, confirmed by speedrun tune (study {plan.study}, {n} trials) on "
                f"{held_out}: no faster values held up on fresh {seeds} (median {best.median_s:.1f} s); {tested}")
    return (f"tuned by speedrun tune (study {plan.study}, trial #{best.trial} of {n}): hyperparameters chosen on "
            f"{held_out} (search seeds = trial numbers; confirmed on fresh {seeds}: median {best.median_s:.1f} s); "
            f"{tested}")


def _counts_text(c: Mapping[str, int]) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])) or "no trials"


def overhead(study) -> dict[str, float]:
    """Tuning overhead per trial, medians over the finished trials: sampling (ask and suggest), the
    trial hook's study reads and writes, the tell, against the trial's wall time."""
    trials = [t for t in study.get_trials(deepcopy=False, states=_finished_states()) if "wall_s" in t.user_attrs]
    if not trials:
        return {}
    tells = study.user_attrs
    rows = []
    for t in trials:
        a = t.user_attrs
        tuning = a.get("ask_s", 0.0) + a.get("hook_s", 0.0) + tells.get(f"tell_s:{t.number}", 0.0)
        rows.append((tuning, a["wall_s"], a.get("total_time_s") or 0.0))
    med = statistics.median
    return {"trials": len(rows), "tuning_s": med(r[0] for r in rows), "wall_s": med(r[1] for r in rows),
            "share": med(r[0] / r[1] for r in rows if r[1] > 0),
            "outside_clock_share": med((r[1] - r[2]) / r[1] for r in rows if r[1] > 0)}
