"""What the commands print for a newcomer: names with brackets, group ids, unevaluated runs, help and
small text (issue 22)."""
from __future__ import annotations

import json
import re

import pytest

from speedrun.cli import build_parser, main
from speedrun.console import percent, plural
from speedrun.recipes import get_recipe
from speedrun.store import RunStore
from tests.conftest import TINY

SETS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


def _stored_run(store: RunStore, run_id: str, recipe, *, tta: float | None, group: str | None = None,
                seed: int = 0) -> None:
    store.start_run(run_id=run_id, recipe_name=recipe.name, recipe=recipe.to_dict(),
                    env={"device_name": "cpu", "python": "3.11.2 (main) [GCC 12.2.0]"}, target=recipe.target,
                    seed=seed, group_id=group)
    store.finish_run(run_id, outcome="reached" if tta else "budget_exhausted", detail="",
                     summary={"time_to_accuracy_s": tta, "best_accuracy": 0.93 if tta else None,
                              "total_time_s": tta or 50.0, "epochs": 1.0},
                     curve=[{"elapsed_s": tta or 50.0, "epoch": 1.0, "step": 9, "accuracy": 0.93 if tta else 0.5,
                             "test_loss": 0.3, "train_loss": 0.4}])


def test_bracketed_names_survive_every_table(capsys, tmp_path, monkeypatch):
    """rich reads ``[baseline]`` as a style tag: the ablation's baseline looked like the full recipe."""
    monkeypatch.setenv("SPEEDRUN_STORE", str(tmp_path / "runs.sqlite"))
    store = RunStore(tmp_path / "runs.sqlite")
    full = get_recipe("fashion-mnist")
    base = get_recipe("baseline").override({"name": "fashion-mnist[baseline]"})
    _stored_run(store, "aaaa000001", full, tta=20.0)
    _stored_run(store, "bbbb000001", base, tta=90.0)
    capsys.readouterr()
    assert main(["runs"]) == 0
    assert "fashion-mnist[baseline]" in capsys.readouterr().out
    assert main(["show", "bbbb"]) == 0
    shown = capsys.readouterr().out
    assert "fashion-mnist[baseline]" in shown and "[GCC 12.2.0]" in shown  # env values are not markup either
    assert main(["compare", "--by", "recipe_name"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "fashion-mnist" in line]
    assert any("fashion-mnist[baseline]" in line for line in rows)
    assert main(["compare", "--by", "recipe"]) == 0
    assert "fashion-mnist[baseline]" in capsys.readouterr().out


def test_seeds_give_a_group_id_that_show_and_runs_accept(capsys, synthetic_dir):
    assert main(["train", "--data", str(synthetic_dir), "--target", "0.6", "--seeds", "2", *SETS, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "run_id" not in r and all(x["run_id"] for x in r["runs"])  # one id per run, the group's apart
    group = r["group_id"]
    assert main(["show", group]) == 0
    out = capsys.readouterr().out
    assert f"group {group}: 2 runs" in out and all(x["run_id"] in out for x in r["runs"])
    assert "2 finished runs, pass-rate 100%, time-to-60% median" in out
    assert main(["show", group[:6], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    (stats,) = shown["statistics"]
    assert shown["group_id"] == group and len(shown["runs"]) == 2 and stats["pass_rate"] == 1.0
    assert stats["median_s"] == pytest.approx(r["median_time_to_accuracy_s"])
    assert main(["runs", "--group", group[:6]]) == 0  # a prefix, and the statistics under the table
    assert "pass-rate 100%" in capsys.readouterr().out
    assert main(["show", "0123456789"]) == 2
    assert "no run or group with id '0123456789'" in capsys.readouterr().err


def test_a_run_never_evaluated_reports_no_accuracy(capsys, unlearnable_dir):
    """Built-in recipes evaluate at the end only: a time budget that ends first saw no evaluation."""
    assert main(["train", "--data", str(unlearnable_dir), "--target", "0.9", "--budget", "0.001s", *SETS,
                 "--json"]) == 1
    r = json.loads(capsys.readouterr().out)
    assert r["outcome"] == "budget_exhausted" and r["curve"] == [] and r["best_accuracy"] is None
    assert main(["show", r["run_id"]]) == 0
    assert re.search(r"best_accuracy +not evaluated", capsys.readouterr().out)
    assert main(["train", "--data", str(unlearnable_dir), "--target", "0.9", "--budget", "0.001s", *SETS]) == 1
    out = capsys.readouterr().out
    assert "best not evaluated" in out and "best 0.00%" not in out


def test_interrupted_is_said_once(capsys, unlearnable_dir, monkeypatch):
    from speedrun.train import hooks

    def interrupt(self, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(hooks.Evaluator, "run", interrupt)
    assert main(["train", "--data", str(unlearnable_dir), "--target", "0.9", *SETS]) == 130
    out = capsys.readouterr().out
    assert "interrupted at step" in out and "interrupted interrupted" not in out


def test_counts_are_singular_when_one():
    from speedrun.cli import _threads

    assert _threads({"threads": 1}) == "1 thread" and _threads({"threads": 2}) == "2 threads"


def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, parser in commands.items():
        helps = [a.help for a in build_parser()._subparsers._group_actions[0]._choices_actions if a.dest == name]
        assert re.search(rf"^ +{re.escape(name)} +{re.escape(helps[0])}$", text, re.M), name


def test_recipes_accepts_a_toml_file_and_prints_targets_as_given(capsys, tmp_path):
    path = tmp_path / "my.toml"
    path.write_text('base = "fashion-mnist"\ntarget = 0.925\n[train]\nepochs = 3\n')
    assert main(["recipes", str(path)]) == 0
    out = capsys.readouterr().out
    assert "train.epochs = 3" in out and "target = 0.925" in out and "name = 'my'" in out
    assert main(["recipes", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["epochs"] == 3
    assert main(["recipes", str(tmp_path / "missing.toml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert main(["recipes"]) == 0
    imagenet = next(line for line in capsys.readouterr().out.splitlines() if "imagenet-resnet50" in line)
    assert "75.9%" in imagenet


def test_small_formatters():
    assert [percent(x) for x in (0.92, 0.759, 0.925, 1.0)] == ["92%", "75.9%", "92.5%", "100%"]
    assert plural(1, "seed") == "1 seed" and plural(2, "seed") == "2 seeds" and plural(0, "run") == "0 runs"


def test_data_info_suggests_the_options_it_was_given(capsys, tmp_path):
    from tests.conftest import write_tree

    tree = write_tree(tmp_path / "tree", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    assert main(["data", "info", str(tree), "--max-size", "32"]) == 2
    err = capsys.readouterr().err
    assert f"speedrun data prepare {tree} --max-size 32`" in err
