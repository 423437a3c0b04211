"""speedrun tune: the penalty's ordering, pruning on synthetic curves, the validation split, the three
phases end to end, the TOML written, bad input, workers on the journal file, resume after kill -9."""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from speedrun.config import ConfigError
from speedrun.recipes import RECIPES, dump_toml, get_recipe, load_toml
from speedrun.store import RunStore
from speedrun.tune import objective as obj
from speedrun.tune.space import check_space, default_space, load_space

ROOT = Path(__file__).resolve().parents[1]
# A recipe that reaches 80% of the synthetic set after one epoch on every seed tried, in about a second.
SETS = {"model.widths": "8,16", "model.pools": "0,1", "model.logit_scale": "1", "model.stem": "conv",
        "optim.name": "sgd", "optim.lr": "0.5", "optim.lr_batch_size": "1024", "train.epochs": "3",
        "train.batch_size": "64", "eval.every_epochs": "1", "eval.start_frac": "0", "eval.tta_flip": "false"}
SPACE = """
[optim.lr]
low = 0.3
high = 0.8
log = true

[train.epochs]
low = 2.0
high = 4.0
"""


def tune_args(data: Path, tmp_path: Path, *extra: str) -> list[str]:
    args = ["tune", "--data", str(data), "--target", "0.8", "--space", str(tmp_path / "space.toml"),
            "--confirm-top", "1", "--confirm-seeds", "1", "--threads", "1", "--out", str(tmp_path / "best.toml")]
    for k, v in SETS.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def exit_code(args: list[str]) -> int:
    """`speedrun ARGS`'s exit status: argparse's own checks exit (SystemExit) with its one-line usage error."""
    from speedrun.cli import main

    try:
        return main(args)
    except SystemExit as e:
        return e.code


@pytest.fixture
def space_file(tmp_path) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(SPACE)
    return path


# ---------------------------------------------------------------- the objective

def test_a_miss_never_ranks_above_a_hit_and_misses_rank_by_distance():
    rng = np.random.default_rng(0)
    target = 0.92
    hits = [obj.objective_value("reached", time_s=t, best_accuracy=target, target=target)
            for t in rng.uniform(1, obj.MAX_TRIAL_BUDGET_S, 200)]
    misses = [obj.objective_value("budget_exhausted", time_s=None, best_accuracy=a, target=target)
              for a in rng.uniform(0, target, 200)]
    assert max(hits) < min(misses)
    by_accuracy = sorted(rng.uniform(0, target, 50))
    values = [obj.objective_value("budget_exhausted", time_s=None, best_accuracy=a, target=target) for a in by_accuracy]
    assert values == sorted(values, reverse=True)  # closer to the target scores lower (better)
    assert obj.objective_value("budget_exhausted", time_s=None, best_accuracy=0.0, target=target) == 2 * obj.MISS_FLOOR_S
    for outcome in ("diverged", "failed"):
        assert obj.objective_value(outcome, time_s=None, best_accuracy=0.9, target=target) > max(misses)


def test_optuna_ranks_a_fast_hit_first_and_the_penalty_formula_is_stated():
    import optuna

    study = optuna.create_study(direction="minimize")
    for outcome, t, acc in (("budget_exhausted", None, 0.919), ("reached", 80.0, 0.93), ("diverged", None, 0.1),
                            ("reached", 30.0, 0.921)):
        trial = study.ask()
        study.tell(trial, obj.objective_value(outcome, time_s=t, best_accuracy=acc, target=0.92))
    assert study.best_value == 30.0
    assert obj.objective_value("budget_exhausted", time_s=None, best_accuracy=0.46, target=0.92) == pytest.approx(
        obj.MISS_FLOOR_S * (1 + (0.92 - 0.46) / 0.92))


# ---------------------------------------------------------------- pruning on synthetic curves

REFERENCE = [(5.0, 0.60), (10.0, 0.85), (20.0, 0.925)]  # the best trial: reached 92% at 20 s
RULE = obj.PruneRule(slack=1.25, margin=0.01)


def test_a_trial_clearly_behind_the_best_at_the_same_time_is_pruned():
    reason = obj.prune_reason([(10.5, 0.80)], elapsed_s=10.6, next_eval_s=None, best_s=20.0, reference=REFERENCE,
                              rule=RULE)
    assert reason and "below the best trial's 85.00%" in reason


def test_a_trial_level_with_the_best_or_ahead_of_it_runs_on():
    for curve in ([(10.5, 0.845)], [(10.5, 0.90)], [(4.0, 0.10)]):  # within the margin, ahead, before its first point
        assert obj.prune_reason(curve, elapsed_s=curve[-1][0], next_eval_s=None, best_s=20.0, reference=REFERENCE,
                                rule=RULE) is None


def test_nothing_is_pruned_before_a_trial_has_reached_the_target():
    assert obj.prune_reason([(10.0, 0.01)], elapsed_s=1e4, next_eval_s=1e5, best_s=None, reference=[],
                            rule=RULE) is None


def test_a_trial_that_can_no_longer_finish_in_time_is_pruned():
    assert "past 1.25x" in obj.prune_reason([], elapsed_s=25.1, next_eval_s=None, best_s=20.0, reference=[], rule=RULE)
    assert obj.prune_reason([], elapsed_s=24.9, next_eval_s=24.9, best_s=20.0, reference=[], rule=RULE) is None
    # Its first evaluation is predicted after 1.25 x 20 s: it cannot reach the target in time, prune now.
    assert "next evaluation" in obj.prune_reason([], elapsed_s=3.0, next_eval_s=31.0, best_s=20.0, reference=[],
                                                 rule=RULE)


def test_the_optuna_pruner_judges_a_running_trial_against_the_best_finished_curve():
    import optuna
    from optuna.trial import TrialState, create_trial
    from optuna.distributions import FloatDistribution

    pruner = obj.TimeToAccuracyPruner(RULE)
    study = optuna.create_study(direction="minimize", pruner=pruner)
    dist = {"x": FloatDistribution(0, 1)}
    for value, curve in ((20.0, REFERENCE), (obj.MISS_FLOOR_S * 1.01, [(5.0, 0.99), (10.0, 0.99)])):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=value, params={"x": 0.5}, distributions=dist,
                                     intermediate_values={int(t * 1000): a for t, a in curve}))
    # The miss's high curve is no reference: only trials that reached the target are.
    assert obj.best_finished(study).value == 20.0
    ahead = study.ask()
    ahead.report(0.86, step=10_500)
    assert not ahead.should_prune()
    behind = study.ask()
    behind.report(0.70, step=10_500)
    assert behind.should_prune() and "85.00%" in pruner.reason


def test_reference_accuracy_is_the_best_reached_by_then():
    assert obj.reference_accuracy(REFERENCE, 4.9) is None
    assert obj.reference_accuracy(REFERENCE, 10.0) == 0.85
    assert obj.reference_accuracy([(1.0, 0.5), (2.0, 0.4)], 3.0) == 0.5


# ---------------------------------------------------------------- the validation split

def test_the_validation_split_is_stratified_disjoint_and_fixed():
    from speedrun.data.split import holdout_split

    labels = np.repeat(np.arange(10), [600, 50, 300, 7, 1000, 20, 2, 400, 90, 31])
    np.random.default_rng(3).shuffle(labels)
    train, val = holdout_split(labels, 0.1)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    counts = np.bincount(labels, minlength=10)
    held = np.bincount(labels[val], minlength=10)
    assert np.all(np.abs(held - np.maximum(1, np.round(0.1 * counts))) <= 1) and np.all(held < counts)
    again_train, again_val = holdout_split(labels.copy(), 0.1)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)


def test_a_run_trains_on_the_rest_validates_on_the_holdout_and_reports_both(synthetic_dir):
    import speedrun

    runs = [speedrun.train("fashion-mnist", data=synthetic_dir, seed=seed, store=False, threads=1,
                           overrides={**SETS, "data.val_frac": 0.25, "eval.split": "val", "target": 0.8})
            for seed in (0, 1)]
    split = [r.env["val_split"] for r in runs]
    assert split[0] == split[1]  # the same images held out whatever the seed
    assert split[0]["val_images"] == 256 and split[0]["train_images"] == 768
    for r in runs:
        assert r.val_accuracy is not None and r.test_accuracy is not None
        assert r.curve[-1].accuracy == r.val_accuracy  # judged on val
        assert r.images_seen <= 3 * 768 and r.epochs <= 3


def test_the_loaders_hold_out_exactly_the_split_rows(synthetic_dir):
    import torch

    from speedrun import data as datalib
    from speedrun.data.split import holdout_split
    from speedrun.train.run import build_loaders

    prepared = datalib.prepare(datalib.resolve(str(synthetic_dir)))
    images = datalib.load_prepared(prepared.directory)
    recipe = get_recipe("fashion-mnist").override({**SETS, "data.val_frac": 0.2, "eval.split": "val"})
    loaders = build_loaders(recipe, prepared.directory, torch.device("cpu"), 0, read_test=False)
    train_rows, val_rows = holdout_split(images.train_labels, 0.2)
    assert loaders.test is None
    assert torch.equal(loaders.val.labels.cpu(), torch.as_tensor(images.train_labels[val_rows]))
    assert torch.equal(loaders.train.images.cpu(), torch.as_tensor(images.train_images[train_rows]))


def test_eval_split_val_needs_a_validation_split():
    with pytest.raises(ConfigError, match="data.val_frac"):
        get_recipe("fashion-mnist").override({"eval.split": "val"})
    with pytest.raises(ConfigError, match="val_frac"):
        get_recipe("fashion-mnist").override({"data.val_frac": 0.9})


def test_train_val_frac_prints_both_accuracies(synthetic_dir, capsys):
    from speedrun.cli import main

    sets = [a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]
    code = main(["train", "--data", str(synthetic_dir), "--target", "0.8", "--val-frac", "0.1", "--threads", "1",
                 *sets])
    out = capsys.readouterr().out
    assert code == 0 and "final accuracy" in out and "val " in out and "test " in out and "(judged)" in out


# ---------------------------------------------------------------- spaces and recipes

def test_every_built_in_recipe_has_a_default_space_it_lies_in():
    from speedrun.tune.space import in_space, recipe_values

    for name in RECIPES:
        recipe = get_recipe(name)
        space = default_space(recipe)
        check_space(recipe, space)
        assert in_space(recipe_values(recipe, space), recipe, space)


@pytest.mark.parametrize("text, message", [
    ("[optim.lrr]\nlow = 0.1\nhigh = 1.0\n", "unknown parameter 'optim.lrr'"),
    ("[optim.lr]\nlow = 1.0\nhigh = 1.0\n", "is empty"),
    ("[optim.lr]\nlow = 2.0\nhigh = 1.0\n", "is inverted"),
    ("[train.batch_size]\nchoices = []\n", "non-empty list of choices"),
    ("[optim.lr]\nlow = 0.0\nhigh = 1.0\nlog = true\n", "log range needs low > 0"),
    ("[optim.lr]\nlo = 0.1\nhigh = 1.0\n", "unknown field 'lo'"),
    ("[train.label_smoothing]\nlow = 0.0\nhigh = 1.5\n", "label_smoothing must be in"),
    ("[target]\nlow = 0.5\nhigh = 0.9\n", "cannot be searched"),
    ("[optim]\nlow = 0.5\nhigh = 0.9\n", "is a section"),
])
def test_bad_space_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "space.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_space(path, get_recipe("fashion-mnist"))


def test_every_built_in_recipe_says_what_its_schedule_was_chosen_on():
    for name in RECIPES:
        assert "chosen on" in get_recipe(name).description, name


def test_dump_toml_reads_back_as_the_same_recipe(tmp_path):
    import dataclasses

    for name in RECIPES:
        recipe = get_recipe(name).override({"train.epochs": 1.3, "data.val_frac": 0.1, "model.bn_momentum": None})
        path = tmp_path / f"{name}.toml"
        path.write_text(dump_toml(recipe, base="fashion-mnist"))
        assert dataclasses.replace(load_toml(path), name=recipe.name) == recipe


# ---------------------------------------------------------------- the command, in process

def _journal_trials(home: Path, study: str) -> list:
    import optuna

    from speedrun.tune.storage import open_storage

    return optuna.load_study(study_name=study, storage=open_storage(str(home / "tune.journal"))).get_trials()


def _confirmation_study(rows):
    """An in-memory study of finished trials: (lr, search time, search accuracy), trial #0 the recipe."""
    import optuna
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(direction="minimize")
    for i, (lr, seconds, accuracy) in enumerate(rows):
        attrs = {"best_accuracy": accuracy, **({"note": "the recipe itself"} if i == 0 else {})}
        study.add_trial(optuna.trial.create_trial(value=seconds, params={"optim.lr": lr},
                                                  distributions={"optim.lr": FloatDistribution(0.1, 2.0)},
                                                  user_attrs=attrs))
    return study


def _fake_train(passing_lrs, ran):
    from types import SimpleNamespace

    def train(recipe, *, seed, **kwargs):
        ran.append((recipe.optim.lr, seed))
        hit = recipe.optim.lr in passing_lrs or seed % 2 == 1  # a failing candidate misses on even seeds
        return SimpleNamespace(run_id=f"{recipe.optim.lr}:{seed}", outcome="reached" if hit else "budget_exhausted",
                               reached=hit, time_to_accuracy_s=20 * recipe.optim.lr if hit else None,
                               best_accuracy=0.93 if hit else 0.918)
    return train


@pytest.mark.parametrize("rounds, passing, winner, confirmed", [
    # Round 1 (#1, #2, the fastest) fails; round 2 takes the fastest beating 92.48%: #4, then #0.
    (3, {0.9}, 4, [1, 2, 4, 0]),
    # Nothing faster passes in the rounds allowed: the recipe itself is confirmed last and wins.
    (1, {0.6}, 0, [1, 2, 0]),
    # Nothing passes at all: no winner.
    (1, set(), None, [1, 2, 0]),
])
def test_confirmation_rounds_then_the_recipe_itself(monkeypatch, rounds, passing, winner, confirmed):
    import dataclasses

    from speedrun.tune import study as study_module

    study = _confirmation_study([(0.6, 30.0, 0.931), (1.0, 10.0, 0.9248), (1.1, 11.0, 0.9215),
                                 (1.2, 12.0, 0.9202), (0.9, 16.7, 0.9277), (0.8, 17.0, 0.921)])
    plan = dataclasses.replace(study_module.make_plan("fashion-mnist", trials=1), confirm_top=2, confirm_seeds=2,
                               confirm_rounds=rounds)
    ran: list = []
    monkeypatch.setattr(study_module, "_train", _fake_train(passing, ran))
    found = study_module.confirm(plan, study, say=lambda line: None, run_store=None)
    assert [c.trial for c in found] == confirmed
    best = study_module.winner(found)
    assert (None if best is None else best.trial) == winner
    # Every confirmation is stored in the study: confirming again trains nothing.
    ran.clear()
    again = study_module.confirm(plan, study, say=lambda line: None, run_store=None)
    assert ran == [] and [c.trial for c in again] == confirmed


def test_the_written_recipe_is_judged_on_test_at_the_test_target():
    from speedrun.tune import study as study_module

    study = _confirmation_study([(0.6, 30.0, 0.931)])
    plan = study_module.make_plan("fashion-mnist", trials=1, target=0.928, test_target=0.92)
    final = study_module.final_recipe(plan, study.trials[0])
    assert plan.base.target == 0.928 and plan.base.eval.split == "val"
    assert final.target == 0.92 and final.eval.split == "test" and final.data.val_frac == 0.1
    same = study_module.final_recipe(study_module.make_plan("fashion-mnist", trials=1, target=0.928), study.trials[0])
    assert same.target == 0.928


def test_tune_searches_confirms_tests_once_and_writes_a_recipe_train_runs(synthetic_dir, space_file, tmp_path,
                                                                          isolated_home, monkeypatch, capsys):
    import dataclasses

    from speedrun.cli import main
    from speedrun.config import from_dict
    from speedrun.train import run as run_module

    reads = []  # (eval.split, test loader built) of every run: the search must never build it
    real = run_module.build_loaders

    def spy(recipe, directory, dev, seed, *, read_test=True):
        loaders = real(recipe, directory, dev, seed, read_test=read_test)
        reads.append((recipe.eval.split, loaders.test is not None))
        return loaders

    monkeypatch.setattr(run_module, "build_loaders", spy)
    code = main(tune_args(synthetic_dir, tmp_path, "--trials", "3", "--study", "s1"))
    out = capsys.readouterr().out
    assert code == 0, out
    # 3 trials + 1 confirmation on validation, without the test split; then one test run that reads it.
    assert reads[:-1] == [("val", False)] * (len(reads) - 1) and reads[-1] == ("test", True)
    assert len(reads) == 3 + 1 + 1
    assert "#0" in out and "best: trial #" in out and "wrote" in out

    trials = _journal_trials(isolated_home, "s1")
    assert len(trials) == 3 and trials[0].user_attrs.get("note") == "the recipe itself"
    store = RunStore(isolated_home / "runs.sqlite")
    runs = store.list_runs(group="s1", limit=None)
    assert len(runs) == 5 and len({r["id"] for r in runs}) == 5
    assert {t.user_attrs["run_id"] for t in trials} <= {r["id"] for r in runs}

    # The TOML holds the winner's values, judged on test with the search's hold-out, and trains unchanged.
    best = load_toml(tmp_path / "best.toml")
    study_test = [r for r in runs if r["recipe"]["eval"]["split"] == "test"][0]
    winner = next(t for t in trials if t.number == int(study_test["recipe_name"].split("#")[1]))
    assert best.optim.lr == winner.params["optim.lr"] and best.train.epochs == winner.params["train.epochs"]
    assert best.eval.split == "test" and best.data.val_frac == 0.1 and "on a 10% validation hold-out" in best.description
    same = lambda r: dataclasses.replace(r, name="x", description="")
    assert same(best) == same(from_dict(study_test["recipe"]))  # the test run trained exactly what was written
    assert main(["train", "--recipe", str(tmp_path / "best.toml"), "--threads", "1"]) == 0

    # Resuming a finished study runs nothing new: the test split is still read only once.
    reads.clear()
    assert main(tune_args(synthetic_dir, tmp_path, "--trials", "3", "--study", "s1")) == 0
    assert reads == []

    assert main(["tune", "show", "s1"]) == 0
    shown = capsys.readouterr().out
    assert "best so far" in shown and "parameter importances" in shown and "confirmations" in shown
    assert main(["tune", "show", "s1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["trials"]) == 3 and summary["test"]["seed"] == 20000

    from speedrun.report import build_report

    report = build_report(store, out=tmp_path / "report")
    page = report.path.read_text()
    assert "Tuning studies" in page and 'id="plot-study-s1"' in page
    # Search trials are not ranked: a study's rows hold its one confirmation run or its one test run only
    # (a search trial of the same configuration would make a row of 2 runs).
    board = page.split("id=leaderboard")[1].split("id=curves")[0]
    study_rows = [re.findall(r"<td>(.*?)</td>", row) for row in board.split("<tr>") if "s1#" in row]
    assert study_rows and all(cells[10] == "1" for cells in study_rows), study_rows


def test_a_study_name_with_another_target_or_recipe_is_refused_and_nothing_written(
        synthetic_dir, space_file, tmp_path, isolated_home, capsys):
    from speedrun.cli import main

    assert main(tune_args(synthetic_dir, tmp_path, "--trials", "1", "--study", "s2")) in (0, 1)
    journal = isolated_home / "tune.journal"
    size = journal.stat().st_size
    (tmp_path / "best.toml").unlink(missing_ok=True)
    capsys.readouterr()
    args = tune_args(synthetic_dir, tmp_path, "--trials", "1", "--study", "s2")
    args[args.index("--target") + 1] = "0.7"
    assert exit_code(args) == 2
    err = capsys.readouterr().err
    assert "exists with another target (80.00%, not 70.00%)" in err and len(err.strip().splitlines()) == 1
    assert main(args[:1] + ["--recipe", "baseline"] + args[1:]) == 2
    assert journal.stat().st_size == size and not (tmp_path / "best.toml").exists()


def test_an_unreachable_storage_is_a_one_line_error(synthetic_dir, space_file, tmp_path, capsys):
    from speedrun.cli import main

    code = main(tune_args(synthetic_dir, tmp_path, "--trials", "1",
                          "--storage", "postgresql://nobody:secret@127.0.0.1:9/none"))
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the study storage postgresql://nobody:***@127.0.0.1:9/none" in err
    assert "secret" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "best.toml").exists()


@pytest.mark.parametrize("extra, message", [
    (["--trials", "1", "--space", "missing.toml"], "search-space file not found"),
    ([], "give --trials N or --time-budget"),
    (["--trials", "1", "--time-budget", "3ep"], "wall-clock time"),
    (["--trials", "1", "--trial-budget", "200000"], "at most"),
    (["--trials", "1", "--prune-slack", "0.5"], "--prune-slack must be >= 1"),
    (["--trials", "1", "--test-target", "1.5"], "target must be in (0, 1]"),
    (["--trials", "1", "--confirm-rounds", "0"], "--confirm-rounds"),
])
def test_bad_tune_options_are_one_line_errors(synthetic_dir, space_file, tmp_path, capsys, extra, message):
    args = tune_args(synthetic_dir, tmp_path, *extra)
    if "--space" in extra:
        args[args.index("--space") + 1] = extra[extra.index("--space") + 1]
    assert exit_code(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bad_test_target_from_the_library_is_a_config_error():
    from speedrun.tune.study import make_plan

    with pytest.raises(ConfigError, match="--test-target must be in"):
        make_plan("fashion-mnist", trials=1, test_target=1.5)


# ---------------------------------------------------------------- processes: workers, kill -9, resume

def _speedrun(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "speedrun", *args], cwd=kw.pop("cwd", ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def check_each_trial_once(trials: list, runs: list[dict], finished: int) -> None:
    """``finished`` trials completed or pruned, each with its own run; a killed trial failed, its run lost."""
    from optuna.trial import TrialState

    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == finished
    ids = [t.user_attrs["run_id"] for t in done]
    assert len(set(ids)) == len(ids)  # no run counted for two trials
    by_id = {r["id"]: r for r in runs}
    assert all(i in by_id for i in ids)  # none lost from the run store
    trial_runs = [r for r in runs if "#" in r["recipe_name"] and r["recipe"]["eval"]["split"] == "val"]
    for t in done:  # each search trial's run appears once in the store
        assert sum(r["id"] == t.user_attrs["run_id"] for r in trial_runs) == 1


def test_two_local_workers_share_the_journal_file(synthetic_dir, space_file, tmp_path, isolated_home):
    proc = _speedrun(tune_args(synthetic_dir, tmp_path, "--trials", "6", "--workers", "2", "--study", "w2"))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "[w0]" in out and "[w1]" in out
    trials = _journal_trials(isolated_home, "w2")
    pids = {t.user_attrs["worker"]["pid"] for t in trials if "worker" in t.user_attrs}
    assert len(pids) >= 2  # both workers ran trials
    runs = RunStore(isolated_home / "runs.sqlite").list_runs(group="w2", limit=None)
    check_each_trial_once(trials, runs, 6)


def _kill_a_worker_mid_trial(home: Path, study: str, proc: subprocess.Popen, storage: str | None = None,
                             *, timeout: float = 240) -> int:
    """Wait for a trial past the first to be running, SIGKILL its worker; the killed trial's number."""
    import optuna
    from optuna.trial import TrialState

    from speedrun.tune.storage import open_storage

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            storage_obj = open_storage(storage or str(home / "tune.journal"))
            trials = optuna.load_study(study_name=study, storage=storage_obj).get_trials()
        except (KeyError, Exception):  # the study is not created yet
            time.sleep(0.2)
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and t.number >= 1 and "worker" in t.user_attrs]
        if running:
            os.kill(running[0].user_attrs["worker"]["pid"], signal.SIGKILL)
            return running[0].number
        time.sleep(0.05)
    raise AssertionError("no trial was seen running")


def test_a_study_resumes_after_kill_9_with_every_trial_recorded_once(synthetic_dir, space_file, tmp_path,
                                                                     isolated_home):
    args = tune_args(synthetic_dir, tmp_path, "--trials", "5", "--study", "k1")
    proc = _speedrun(args)
    killed = _kill_a_worker_mid_trial(isolated_home, "k1", proc)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    again = _speedrun(args)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert f"trial #{killed}: its worker is gone; failed" in out
    trials = _journal_trials(isolated_home, "k1")
    lost = [t for t in trials if t.number == killed][0]
    assert lost.state.name == "FAIL" and lost.user_attrs["outcome"] == "lost"
    runs = RunStore(isolated_home / "runs.sqlite").list_runs(group="k1", limit=None)
    check_each_trial_once(trials, runs, 5)
    # The killed trial's run reads back lost when the kill came after it started (not while the trial was
    # still preparing); nothing stays running.
    assert sum(r["outcome"] == "lost" for r in runs) <= 1 and not any(r["outcome"] == "running" for r in runs)


# ---------------------------------------------------------------- PostgreSQL, started here on loopback

def _postgres_bin(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture
def postgres(tmp_path):
    """A PostgreSQL server of Debian's package, on 127.0.0.1, in a temporary folder, stopped at the end.
    initdb refuses to run as root: as root it runs as the `postgres` user the package creates."""
    import pwd
    import shutil
    import socket
    import tempfile

    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (scripts/setup.sh installs Debian's postgresql package)")
    pytest.importorskip("psycopg", reason="psycopg (SQLAlchemy's PostgreSQL driver) is not installed")
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as (initdb refuses root)")
        prefix = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else []
        if not prefix:
            pytest.skip("running as root without runuser: cannot start the server as the postgres user")
    folder = Path(tempfile.mkdtemp(prefix="speedrun-pg-"))  # outside pytest's root-only tmp tree
    os.chmod(folder, 0o755)
    if prefix:
        shutil.chown(folder, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = folder / "data"
    run = lambda *cmd: subprocess.run([*prefix, *cmd], check=True, capture_output=True, text=True, timeout=120)
    try:
        run(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
        run(pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_postgresql_survive_a_kill_9_and_resume(postgres, synthetic_dir, space_file, tmp_path,
                                                               isolated_home):
    import optuna

    from speedrun.tune.storage import open_storage

    args = tune_args(synthetic_dir, tmp_path, "--trials", "6", "--workers", "2", "--study", "pg",
                     "--storage", postgres)
    proc = _speedrun(args)
    killed = _kill_a_worker_mid_trial(isolated_home, "pg", proc, postgres)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out  # the other worker and the command finish the study
    again = _speedrun(args)  # the same command again: resumes, finds it done, tests nothing twice
    out2, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out2
    trials = optuna.load_study(study_name="pg", storage=open_storage(postgres)).get_trials()
    assert [t for t in trials if t.number == killed][0].state.name == "FAIL"
    runs = RunStore(isolated_home / "runs.sqlite").list_runs(group="pg", limit=None)
    check_each_trial_once(trials, runs, 6)
    assert sum(r["recipe"]["eval"]["split"] == "test" for r in runs) == 1  # the test split, measured once
