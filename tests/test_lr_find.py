"""The LR range test: pure functions against hand-computed values, the hook's events, the command end to end."""
import json
import math

import pytest
import torch

from speedrun.cli import main
from speedrun.config import ConfigError
from speedrun.lr_find import (RangeTest, check_range, default_beta, ema_centres, lr_find, lrs_at, lr_sequence,
                              smooth_losses, suggest_lr)
from speedrun.train.loop import StopFit
from tests.conftest import TINY

SETS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]


def test_lr_sequence_is_geometric_from_start_to_end():
    assert lr_sequence(1e-3, 1e-1, 3) == pytest.approx([1e-3, 1e-2, 1e-1])
    lrs = lr_sequence(1e-5, 10.0, 10)
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([1e6 ** (1 / 9)] * 9)
    with pytest.raises(ValueError):
        lr_sequence(1.0, 0.1, 10)


def test_smoothing_is_a_bias_corrected_ema():
    # beta 0.5: avg = 1, 1, 2.5 over weights 0.5, 0.75, 0.875
    assert smooth_losses([2.0, 1.0, 4.0], beta=0.5) == pytest.approx([2.0, 4 / 3, 20 / 7])
    assert smooth_losses([3.0, 1.0, 2.0], beta=0.0) == [3.0, 1.0, 2.0]
    assert smooth_losses([5.0] * 20, beta=0.98) == pytest.approx([5.0] * 20)  # no pull toward 0


def test_ema_centres_undo_the_lag_of_a_linear_trend():
    assert ema_centres(3, beta=0.5) == pytest.approx([0.0, 2 / 3, 10 / 7])
    assert ema_centres(4, beta=0.0) == [0.0, 1.0, 2.0, 3.0]
    centres = ema_centres(200, beta=0.9)
    assert centres[-1] == pytest.approx(199 - 0.9 / 0.1, abs=1e-6)  # steady-state lag beta / (1 - beta)
    smoothed = smooth_losses([3.0 - 0.01 * i for i in range(200)], beta=0.9)
    assert smoothed == pytest.approx([3.0 - 0.01 * c for c in centres])


def test_lrs_at_interpolates_in_log_space():
    lrs = [1.0, 100.0, 1e4]
    assert lrs_at(lrs, [0.0, 0.5, 1.0, 1.5, 2.0]) == pytest.approx([1.0, 10.0, 100.0, 1e3, 1e4])


def test_suggestion_is_the_steepest_fall_per_log_lr_before_the_minimum():
    s = suggest_lr([1, 10, 100, 1000, 10000], [5.0, 4.9, 3.0, 2.5, 2.6])
    assert (s.steepest_lr, s.min_loss_lr, s.min_loss_lr_div10) == (10, 1000, 100)
    # per unit of ln(LR): (4 - 5)/ln 10 = -0.43 is steeper than (2.5 - 4)/ln 100 = -0.33
    assert suggest_lr([1, 10, 1000, 1e4], [5.0, 4.0, 2.5, 3.0]).steepest_lr == 1
    # the fall from 9 to 2.5 comes after the minimum (2.0): rising into divergence, ignored
    s = suggest_lr([1, 2, 4, 8, 16, 32], [5.0, 4.0, 2.0, 9.0, 2.5, 20.0])
    assert (s.steepest_lr, s.min_loss_lr) == (2, 4)
    assert suggest_lr([1, 2, 4, 8], [9.0, 1.0, 0.8, 0.7]).steepest_lr == 1
    assert suggest_lr([1, 2, 4, 8], [9.0, 1.0, 0.8, 0.7], skip_start=1).steepest_lr == 2
    assert suggest_lr([1, 2, 4], [1.0, 2.0, 3.0]).steepest_lr is None  # never fell
    assert suggest_lr([1, 2, 4], [1.0, 0.5, math.nan]).min_loss_lr == 2
    with pytest.raises(ValueError):
        suggest_lr([1, 2], [1.0])


def test_default_beta_keeps_the_window_a_tenth_of_the_sweep():
    assert default_beta(100) == pytest.approx(0.9) and default_beta(500) == pytest.approx(0.98)
    assert default_beta(10) == 0.0


@pytest.mark.parametrize("kw, message", [
    (dict(start_lr=1.0, end_lr=1.0, steps=100), "--end-lr must be greater than --start-lr"),
    (dict(start_lr=1.0, end_lr=0.1, steps=100), "--end-lr must be greater than --start-lr"),
    (dict(start_lr=0.0, end_lr=1.0, steps=100), "--start-lr must be > 0"),
    (dict(start_lr=1e-3, end_lr=1.0, steps=9), "--steps must be >= 10"),
    (dict(start_lr=1e-3, end_lr=1.0, steps=100, beta=1.0), "--smoothing must be in [0, 1)"),
    (dict(start_lr=1e-3, end_lr=1.0, steps=100, diverge_factor=1.0), "--diverge-factor must be > 1"),
])
def test_bad_ranges_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        check_range(**kw)


class FakeState:
    def __init__(self, loss):
        p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        self.optimizer = torch.optim.SGD([{"params": [p]}, {"params": [q], "weight_decay": 0.0}], lr=1.0)
        self.step, self.loss = 0, torch.tensor(loss)


def test_hook_keeps_each_groups_ratio_to_the_recipe_lr():
    state = FakeState(1.0)
    state.optimizer.param_groups[0]["peak_lr"], state.optimizer.param_groups[1]["peak_lr"] = 0.6, 38.4
    hook = RangeTest([0.01, 0.1], beta=0.0, reference_lr=0.6)
    state.step = 1
    hook.before_batch(state)
    assert [g["lr"] for g in state.optimizer.param_groups] == pytest.approx([0.1, 6.4])


def test_hook_sets_every_group_and_stops_when_the_smoothed_loss_diverges():
    hook = RangeTest([0.1, 0.2, 0.4, 0.8], beta=0.0, diverge_factor=4.0)
    state = FakeState(2.0)
    for step, loss in enumerate([2.0, 1.0, 3.9]):
        state.step, state.loss = step, torch.tensor(loss)
        hook.before_batch(state)
        assert [g["lr"] for g in state.optimizer.param_groups] == [hook.lrs[step]] * 2
        hook.after_loss(state)
    state.step, state.loss = 3, torch.tensor(4.1)  # > 4 x the best (1.0)
    with pytest.raises(StopFit) as stop:
        hook.after_loss(state)
    assert stop.value.outcome == "diverged" and "at step 3" in stop.value.detail
    assert hook.losses == pytest.approx([2.0, 1.0, 3.9, 4.1])
    with pytest.raises(StopFit, match="loss became nan at step 0"):
        RangeTest([0.1], beta=0.9).after_loss(FakeState(float("nan")))


def test_command_end_to_end_json_and_plot(capsys, synthetic_dir, tmp_path):
    plot = tmp_path / "lr.png"
    code = main(["lr-find", "--data", str(synthetic_dir), *SETS, "--steps", "20", "--start-lr", "1e-4",
                 "--end-lr", "1", "--plot", str(plot), "--json",
                 "--device", "cpu"])  # on a GPU (bf16) the loss at LR 1 on this data trips the divergence stop
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["outcome"] == "completed" and r["steps_planned"] == 20
    assert r["lrs"] == pytest.approx(lr_sequence(1e-4, 1.0, 20)) and len(r["losses"]) == 20
    assert r["smoothed"] == pytest.approx(smooth_losses(r["losses"], beta=default_beta(20)))
    assert all(0 < x < 5 for x in r["losses"]) and r["beta"] == pytest.approx(0.5)
    s = r["suggestion"]
    expected = suggest_lr(r["smoothed_lrs"], r["smoothed"], skip_start=2)
    # fashion-mnist's one-cycle schedule peaks and anneals: its peak near the loss minimum
    assert r["schedule"] == "one-cycle" and s["lr"] == pytest.approx(expected.min_loss_lr)
    assert s["steepest_lr"] == pytest.approx(expected.steepest_lr) and s["steepest_lr"] < s["lr"]
    # TINY trains at batch 128 with optim.lr given per 1024 examples: optim.lr = lr * 1024 / 128
    assert r["batch_size"] == 128 and r["lr_batch_size"] == 1024
    assert s["optim_lr"] == pytest.approx(s["lr"] * 8) and s["min_loss_div10_optim_lr"] == pytest.approx(
        s["min_loss_lr"] * 0.8)
    # the sweep kept Muon's LR at its ratio to optim.lr (0.15 : 0.5 with TINY): so does the suggestion
    assert s["sets"] == pytest.approx({"optim.lr": s["optim_lr"], "optim.muon_lr": s["optim_lr"] * 0.15 / 0.5})
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and r["plot"] == str(plot)

    assert main(["lr-find", "--data", str(synthetic_dir), *SETS, "--steps", "10", "--no-plot"]) in (0, 1)
    text = capsys.readouterr().out
    assert "steepest descent" in text and "optim.lr (per 1024 examples)" in text and "plot" not in text
    assert "<- suggested: the peak of a one-cycle schedule" in text and "--set optim.muon_lr=" in text

    # a constant LR trains at its value throughout: the steepest descent
    main(["lr-find", "--data", str(synthetic_dir), *SETS, "--set", "schedule.kind=constant", "--set",
          "optim.name=sgd", "--steps", "20", "--start-lr", "1e-4", "--end-lr", "1", "--no-plot", "--json",
          "--device", "cpu"])
    r = json.loads(capsys.readouterr().out)
    expected = suggest_lr(r["smoothed_lrs"], r["smoothed"], skip_start=2)
    assert r["suggestion"]["lr"] == pytest.approx(expected.steepest_lr)
    assert r["suggestion"]["sets"] == pytest.approx({"optim.lr": r["suggestion"]["optim_lr"]})


def test_divergence_stops_the_sweep_early(capsys, synthetic_dir):
    code = main(["lr-find", "--data", str(synthetic_dir), *SETS, "--steps", "40", "--start-lr", "1e-3",
                 "--end-lr", "1e8", "--no-plot", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["outcome"] == "diverged" and len(r["losses"]) < 40 and "at step" in r["detail"]
    assert code == 0 and r["suggestion"]["lr"] < r["lrs"][-1]


def test_nothing_leaks_into_the_caller_or_a_second_run(synthetic_dir):
    torch.manual_seed(123)
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    kw = dict(data=synthetic_dir, overrides=TINY, steps=12, start_lr=1e-3, end_lr=1.0, threads=1)
    first, second = lr_find("fashion-mnist", **kw), lr_find("fashion-mnist", **kw)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert first.losses == second.losses  # the second run saw no state of the first
    assert not any(isinstance(v, (torch.nn.Module, torch.optim.Optimizer)) for v in vars(first).values())


@pytest.mark.parametrize("argv, message", [
    (["--start-lr", "1", "--end-lr", "0.5"], "--end-lr must be greater than --start-lr"),
    (["--steps", "5"], "--steps must be >= 10"),
    (["--smoothing", "1.5"], "--smoothing must be in [0, 1)"),
    (["--plot", "/nonexistent-dir/x.png"], "does not exist"),
    (["--set", "optim.lr=-1"], "optim.lr and optim.lr_batch_size must be > 0"),
])
def test_bad_arguments_fail_in_one_line(capsys, synthetic_dir, argv, message):
    assert main(["lr-find", "--data", str(synthetic_dir), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_the_suggested_peak_trains_the_default_recipe_as_well_as_its_own_lr(fashion_slice):
    """The suggestion for fashion-mnist (one-cycle) is a peak, near the loss minimum: trained with it, the
    recipe does as well as with its own tuned LR, where the steepest descent (a constant LR's choice,
    suggested before issue 22) falls far short. On 6,000 real images, 1.75 epochs, one seed: seeds 0
    and 1 of the recipe itself differ by 1.7 points (87.4%, 85.7%); the suggestion gave 85.9% and
    86.3%, the steepest descent 75.0% and 76.7%."""
    from speedrun.train.run import train

    r = lr_find("fashion-mnist", data=fashion_slice)
    assert r.method == "min_loss" and r.suggested_lr == r.suggestion.min_loss_lr
    sets = r.suggested_sets()
    assert set(sets) == {"optim.lr", "optim.muon_lr"}
    steepest = {"optim.lr": r.to_optim_lr(r.suggestion.steepest_lr)}
    steepest["optim.muon_lr"] = r.recipe_muon_lr * steepest["optim.lr"] / r.recipe_optim_lr

    def accuracy(overrides) -> float:
        return train("fashion-mnist", data=fashion_slice, seed=0, store=None, stop_at_target=False,
                     overrides=overrides).final_accuracy

    recipe, suggested, constant = accuracy({}), accuracy(sets), accuracy(steepest)
    assert suggested >= recipe - 0.02, (suggested, recipe)  # within the seed-to-seed spread
    assert suggested >= constant + 0.05, (suggested, constant)
