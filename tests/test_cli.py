"""End-to-end: the speedrun command on tiny data, and every bad input of the train command."""
import json
import os
import subprocess
import sys

import pytest

import speedrun
from speedrun.cli import main
from tests.conftest import TINY

SETS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


def run_json(capsys, *argv):
    code = main(["train", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_train_reaches_a_modest_target_and_is_stored(capsys, synthetic_dir):
    code, r = run_json(capsys, "--data", str(synthetic_dir), "--target", "0.6", *SETS)
    assert code == 0 and r["reached"] and r["outcome"] == "reached"
    for key in ("run_id", "recipe", "target", "time_to_accuracy_s", "train_time_s", "best_accuracy", "epochs",
                "images_per_s", "mfu", "device", "torch_version", "prepare_s", "flops_per_image"):
        assert key in r, key
    assert 0 < r["train_time_s"] < r["time_to_accuracy_s"] and r["best_accuracy"] >= 0.6
    assert r["flops_per_image"] > 0 and 0 < r["mfu"] < 1.5 and r["images_per_s"] > 0

    assert main(["runs", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [x["id"] for x in runs] == [r["run_id"]] and runs[0]["outcome"] == "reached"
    assert main(["show", r["run_id"][:6], "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["recipe"]["model"]["widths"] == [8, 16] and shown["recipe"]["target"] == 0.6
    assert shown["env"]["torch_version"] and shown["env"]["code_version"] and shown["env"]["threads"] >= 1
    assert shown["curve"] and shown["curve"][-1]["accuracy"] == r["best_accuracy"]
    assert main(["show", r["run_id"]]) == 0 and "curve" in capsys.readouterr().out


def test_real_fashion_mnist_slice(capsys, fashion_slice):
    code, r = run_json(capsys, "--data", str(fashion_slice), "--target", "0.65", "--set", "train.epochs=2", "--set", "optim.lr=0.5",
                       "--set", "eval.start_frac=0", "--set", "model.widths=16,32", "--set", "model.pools=0,1")
    assert code == 0 and r["reached"], r["detail"]


def test_seeds_report_spread_and_pass_rate(capsys, synthetic_dir):
    code, r = run_json(capsys, "--data", str(synthetic_dir), "--target", "0.6", "--seeds", "3", "--seed", "5",
                       *SETS)
    assert code == 0 and r["pass_rate"] == 1.0 and [x["seed"] for x in r["runs"]] == [5, 6, 7]
    times = sorted(x["time_to_accuracy_s"] for x in r["runs"])
    assert r["median_time_to_accuracy_s"] == times[1] and r["mlperf_time_to_accuracy_s"] == times[1]
    main(["runs", "--group", r["group_id"], "--json"])
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_unreachable_target_exhausts_the_schedule(capsys, unlearnable_dir):
    code, r = run_json(capsys, "--data", str(unlearnable_dir), "--target", "0.9", *SETS, "--set",
                       "train.epochs=1")
    assert code == 1 and r["outcome"] == "budget_exhausted" and r["time_to_accuracy_s"] is None
    assert "schedule of 1 epochs ended" in r["detail"]


def test_budgets_cap_the_run(capsys, unlearnable_dir):
    code, r = run_json(capsys, "--data", str(unlearnable_dir), "--target", "0.9", "--budget", "1ep", *SETS,
                       "--set", "train.epochs=5")
    assert code == 1 and r["outcome"] == "budget_exhausted" and r["epochs"] == 1.0
    assert "epoch budget ended" in r["detail"]
    code, r = run_json(capsys, "--data", str(unlearnable_dir), "--target", "0.9", "--budget", "0.001s", *SETS)
    assert r["outcome"] == "budget_exhausted" and "time budget" in r["detail"] and r["steps"] == 1


def test_nan_loss_is_recorded_as_diverged(capsys, synthetic_dir):
    # On the CPU: on a GPU (bf16) this LR stayed finite through the tiny schedule.
    code, r = run_json(capsys, "--data", str(synthetic_dir), *SETS, "--set", "optim.lr=1e30",
                       "--set", "schedule.kind=constant", "--device", "cpu")
    assert code == 1 and r["outcome"] == "diverged" and "at step" in r["detail"]
    main(["runs", "--outcome", "diverged", "--json"])
    assert json.loads(capsys.readouterr().out)[0]["id"] == r["run_id"]


def test_ctrl_c_is_recorded_as_interrupted_with_its_curve(capsys, unlearnable_dir, monkeypatch):
    from speedrun.train import hooks

    real_run = hooks.Evaluator.run

    def run_then_interrupt(self, state):
        if self.curve:
            raise KeyboardInterrupt
        return real_run(self, state)

    monkeypatch.setattr(hooks.Evaluator, "run", run_then_interrupt)
    code, r = run_json(capsys, "--data", str(unlearnable_dir), "--target", "0.9", *SETS)
    assert code == 130 and r["outcome"] == "interrupted"
    main(["show", r["run_id"], "--json"])
    stored = json.loads(capsys.readouterr().out)
    assert stored["outcome"] == "interrupted" and len(stored["curve"]) == 1


@pytest.mark.parametrize("argv,message", [
    (["--data", "/nonexistent/fmnist"], "dataset not found: /nonexistent/fmnist"),
    (["--recipe", "nope"], "unknown recipe 'nope'; built-in recipes: fashion-mnist"),
    (["--set", "train.epoch=3"], "unknown key 'train.epoch'; valid keys here: train.epochs"),
    (["--set", "train.epochs"], "--set expects section.key=value"),
    (["--budget", "0"], "budget must be > 0"),
    (["--budget", "soon"], "budget 'soon' not understood"),
    (["--recipe", "missing.toml"], "recipe file not found"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    assert main(["train", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize("target", ["1.5", "0", "-0.2", "abc"])
def test_impossible_target_is_a_usage_error(capsys, target):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--target", target])
    assert exit_info.value.code == 2 and "--target" in capsys.readouterr().err


def test_unwritable_store_still_prints_the_result(capsys, synthetic_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = main(["train", "--data", str(synthetic_dir), "--target", "0.6", *SETS, "--store",
                 str(blocker / "runs.sqlite")])
    captured = capsys.readouterr()
    assert code == 0 and "cannot open the run store" in captured.err  # the run's own exit code: it reached
    assert "1 of 1 run(s) not recorded in the run store" in captured.err
    assert "time-to-accuracy" in captured.out and "reached" in captured.out


def test_python_api_returns_the_model(synthetic_dir):
    result = speedrun.train(data=synthetic_dir, target=0.6, store=None, overrides=TINY, seed=1)
    assert result.reached and result.model is not None
    assert result.time_to_accuracy_s == result.curve[-1].elapsed_s
    keywords = {key.replace(".", "__"): value for key, value in TINY.items()}  # optim.lr -> optim__lr
    result2 = speedrun.train(data=synthetic_dir, target=0.6, store=None, seed=1, **keywords)
    assert result2.recipe == result.recipe


def test_recipes_command(capsys):
    assert main(["recipes", "--json"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert "fashion-mnist" in names and "baseline" in names
    assert main(["recipes", "fashion-mnist"]) == 0 and "train.batch_size" in capsys.readouterr().out


def test_installed_command_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "speedrun", "train", "--recipe", "nope"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "unknown recipe" in proc.stderr and "Traceback" not in proc.stderr


def test_tables_piped_into_a_file_are_not_squeezed_to_80_columns():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run([sys.executable, "-m", "speedrun", "recipes"], capture_output=True, text=True, env=env)
    fashion = next(line for line in proc.stdout.splitlines() if "fashion-mnist" in line)
    assert "the CPU default: fast conv net to 92% on Fashion-MNIST" in fashion  # one row, one line
    narrow = subprocess.run([sys.executable, "-m", "speedrun", "recipes"], capture_output=True, text=True,
                            env={**env, "COLUMNS": "60"})
    assert max(map(len, narrow.stdout.splitlines())) <= 60  # COLUMNS still rules


def test_store_failing_at_the_end_keeps_the_result(capsys, synthetic_dir, monkeypatch):
    from speedrun.store import RunStore, StoreError

    def broken_finish(self, *args, **kwargs):
        raise StoreError("cannot write to the run store at X: disk I/O error")

    monkeypatch.setattr(RunStore, "finish_run", broken_finish)
    code = main(["train", "--data", str(synthetic_dir), "--target", "0.6", *SETS])
    captured = capsys.readouterr()
    assert code == 0 and "disk I/O error" in captured.err and "not recorded" in captured.err
    assert "time-to-accuracy" in captured.out


def test_cosine_schedule_with_momentum_cycling_trains(synthetic_dir):
    result = speedrun.train(data=synthetic_dir, target=0.6, store=None, overrides={
        **TINY, "schedule.kind": "cosine", "schedule.warmup_frac": "0.1", "schedule.momentum_low": "0.8"})
    assert result.reached, result.detail


def test_alternating_flip_and_cutout_train(synthetic_dir):
    result = speedrun.train(data=synthetic_dir, target=0.6, store=None, overrides={
        **TINY, "data.alternating_flip": "true", "data.cutout_px": "4"})
    assert result.reached, result.detail


def test_progressive_resizing_trains_and_scales_the_flop_count(synthetic_dir):
    plain = speedrun.train(data=synthetic_dir, target=0.6, store=None, overrides=TINY)
    resized = speedrun.train(data=synthetic_dir, target=0.6, store=None, overrides={
        **TINY, "data.resize_start_scale": "0.5", "data.resize_full_frac": "0.5"})
    assert resized.reached, resized.detail
    assert resized.flops_per_image < plain.flops_per_image
