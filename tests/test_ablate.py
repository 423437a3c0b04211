"""``speedrun ablate``: the plan, the run order, resume, re-tuning, and one tiny end-to-end ablation on CPU."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest
from rich.console import Console

from speedrun import ablate as ablate_mod
from speedrun.ablate import AblationInterrupted, ablate, load_result, plan_variants, print_result, run_order
from speedrun.config import ConfigError
from speedrun.recipes import get_recipe
from speedrun.store import RunStore
from speedrun.techniques.registry import TECHNIQUES, Technique
from tests.conftest import TINY

# TINY, with the values that decide whether a run reaches the target pinned, so that recipe
# changes elsewhere do not turn this test's reaching variants into failing ones.
PINNED = {**TINY, "model.logit_scale": "1", "model.activation": "gelu", "eval.tta_flip": "false", "eval.every_epochs": "0.5",
          "optim.name": "sgd", "optim.lr": "0.5", "optim.lr_batch_size": "1024", "schedule.kind": "one-cycle",
          "schedule.warmup_frac": "0.25", "schedule.start_factor": "0.1", "train.epochs": "2"}


def _technique(name: str, section: str, key: str, on, off) -> Technique:
    """A test-only technique: ``section.key`` at ``on`` when enabled, ``off`` when disabled."""
    return Technique(name, "test", "test", "test", "none", f"{section}.{key}",
                     lambda r: getattr(getattr(r, section), key) == on,
                     lambda r: r.override({f"{section}.{key}": off}))


# ---------------------------------------------------------------- the plan

def test_plan_leave_one_out_add_one_in_and_both():
    recipe = get_recipe("fashion-mnist")
    names = [n for n, t in TECHNIQUES.items() if t.enabled(recipe) and not t.process_wide]
    assert len(names) >= 3
    loo = plan_variants(recipe, mode="leave-one-out")
    assert [v.name for v in loo] == ["full", "baseline", *[f"-{n}" for n in names]]
    assert loo[0].recipe == recipe and loo[1].recipe.name == "fashion-mnist[baseline]"
    for v in loo[2:]:
        (t,) = v.disabled
        assert not TECHNIQUES[t].enabled(v.recipe)
        assert all(TECHNIQUES[o].enabled(v.recipe) for o in names if o != t)
    assert not any(TECHNIQUES[n].enabled(loo[1].recipe) for n in names)
    both = plan_variants(recipe, mode="both")
    assert [v.name for v in both] == [v.name for v in loo] + [f"+{n}" for n in names]
    plus = both[-1]
    assert [n for n in names if TECHNIQUES[n].enabled(plus.recipe)] == [names[-1]]


def test_plan_merges_identical_variants_and_adds_pairs():
    recipe = get_recipe("fashion-mnist")
    two = plan_variants(recipe, mode="both", techniques=["flip", "label-smoothing"])
    assert [v.name for v in two] == ["full", "baseline", "-flip", "-label-smoothing"]  # -flip is +label-smoothing
    three = plan_variants(recipe, mode="leave-one-out", techniques=["flip", "label-smoothing", "one-cycle"],
                          pairs=True)
    assert [v.name for v in three][-3:] == ["+one-cycle", "+label-smoothing", "+flip"]  # with 3, -a-b is +c
    four = plan_variants(recipe, techniques=["flip", "label-smoothing", "one-cycle", "channels-last"], pairs=True)
    assert len(four) == 2 + 4 + 6 and four[6].name == "-flip-label-smoothing"


@pytest.mark.parametrize("kwargs,message", [
    ({"techniques": ["nope"]}, "unknown technique 'nope'; known: one-cycle"),
    ({"techniques": ["flip"]}, "technique 'flip' is not enabled in recipe 'fashion-mnist'"),
    ({"mode": "sideways"}, "unknown mode 'sideways'"),
    ({"techniques": ["retain-memory"]}, "technique 'retain-memory' is process-wide"),
])
def test_plan_errors_are_one_line(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan_variants(get_recipe("fashion-mnist").override({"data.flip": False}), **kwargs)


def test_run_order_is_seed_major_and_rotated():
    order = run_order(["full", "baseline", "-a"], [0, 1, 2])
    assert [s for s, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [v for s, v in order if s == 1] == ["baseline", "-a", "full"]
    firsts = {v for s, v in order[::3]}
    assert firsts == {"full", "baseline", "-a"}  # the first slot of each seed goes to every variant in turn


# ---------------------------------------------------------------- the runner, with a fake trainer

@dataclass
class FakeResult:
    run_id: str
    seed: int
    outcome: str
    time_to_accuracy_s: float | None
    total_time_s: float
    best_accuracy: float
    epochs: float
    detail: str = ""
    model: object = None
    env: dict = field(default_factory=dict)

    @property
    def reached(self) -> bool:
        return self.outcome == "reached"


class FakeTrainer:
    """Time-to-accuracy = 10 s x the product of each disabled technique's cost; records like train()."""

    def __init__(self, costs: dict[str, float], min_epochs: dict[str, float] | None = None,
                 interrupt_at: int | None = None) -> None:
        self.costs, self.min_epochs, self.interrupt_at = costs, min_epochs or {}, interrupt_at
        self.calls: list[tuple[str, int, float]] = []
        self.made = 0

    def __call__(self, recipe, *, seed, store, group_id, **_):
        self.calls.append((recipe.name, seed, recipe.train.epochs))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        tta = 10.0 * (1 + 0.01 * seed)
        reached = True
        for name, cost in self.costs.items():
            if f"-{name}" in recipe.name or ("[" in recipe.name and "baseline" in recipe.name):
                tta = None if cost is None or tta is None else tta * cost
        need = self.min_epochs.get(recipe.name, 0.0)
        reached = tta is not None and recipe.train.epochs >= need
        self.made += 1
        run_id = f"r{self.made:03d}"
        r = FakeResult(run_id, seed, "reached" if reached else "budget_exhausted", tta if reached else None,
                       tta if reached else 50.0, 0.93 if reached else 0.61, recipe.train.epochs)
        store.start_run(run_id=run_id, recipe_name=recipe.name, recipe=recipe.to_dict(), env={"device_name": "x"},
                        target=recipe.target, seed=seed, group_id=group_id)
        store.finish_run(run_id, outcome=r.outcome, detail="", summary={
            "time_to_accuracy_s": r.time_to_accuracy_s, "best_accuracy": r.best_accuracy,
            "total_time_s": r.total_time_s, "epochs": r.epochs}, curve=[])
        return r


TWO = {"flip": TECHNIQUES["flip"], "label-smoothing": TECHNIQUES["label-smoothing"]}


def test_fake_ablation_attributes_known_factors_and_reports_never_reaching(tmp_path, monkeypatch):
    trainer = FakeTrainer({"flip": 2.0, "label-smoothing": None})  # without label smoothing: never reaches
    monkeypatch.setattr(ablate_mod, "_train", trainer)
    store = RunStore(tmp_path / "runs.sqlite")
    lines = []
    result = ablate("fashion-mnist", seeds=3, mode="leave-one-out", techniques=TWO, store=store,
                    progress=lines.append, resamples=500)
    assert len(trainer.calls) == 4 * 3 and result.complete
    variants = {v.name: v for v in result.variants}
    assert set(variants) == {"full", "baseline", "-flip", "-label-smoothing"}
    never = variants["-label-smoothing"]
    assert never.never_reached and never.median_s is None and never.best_accuracy == 0.61 and len(never.runs) == 3
    effects = {e.technique: e for e in result.attribution.effects}
    assert effects["flip"].speedup.value == pytest.approx(2.0)
    assert effects["label-smoothing"].speedup.kind == "lower_bound"
    assert effects["label-smoothing"].speedup.value == pytest.approx(50.0 / 10.1)
    assert effects["label-smoothing"].pass_rate_without == 0.0
    assert sum("reached in" in line for line in lines) == 6 and sum("budget exhausted" in line for line in lines) == 6
    assert variants["baseline"].never_reached and result.attribution.total.kind == "lower_bound"
    console = Console(record=True, width=200)
    print_result(result, console)
    text = console.export_text()
    assert "never reached (best 61.0%)" in text and ">= 4.95x" in text and "2.00x [" in text
    assert "needed to reach the target (without it: best 61.0%); >= 4.95x" in text
    stored = store.get_ablation(result.ablation_id)
    assert stored["status"] == "complete" and stored["result"]["variants"][3]["never_reached"]
    assert {r["id"] for r in store.list_runs(group=result.ablation_id, limit=None)} == \
        {r.run_id for v in result.variants for r in v.runs}


def test_interrupted_ablation_resumes_where_it_stopped(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "runs.sqlite")
    trainer = FakeTrainer({"flip": 2.0, "label-smoothing": 1.5}, interrupt_at=5)
    monkeypatch.setattr(ablate_mod, "_train", trainer)
    with pytest.raises(AblationInterrupted) as stopped:
        ablate("fashion-mnist", seeds=2, techniques=TWO, store=store, resamples=200)
    ablation_id = stopped.value.ablation_id
    assert len(store.ablation_runs(ablation_id)) == 4
    partial = load_result(store, ablation_id, resamples=200)
    assert not partial.complete and sum(len(v.runs) for v in partial.variants) == 4

    trainer.interrupt_at, trainer.calls = None, []
    result = ablate("fashion-mnist", seeds=2, techniques=TWO, store=store, resamples=200)  # the same command
    assert result.ablation_id == ablation_id and result.complete
    assert len(trainer.calls) == 4  # only the runs not yet done
    assert [(c[0], c[1]) for c in trainer.calls] == [(n, 1) for n in (
        "fashion-mnist[baseline]", "fashion-mnist[-flip]", "fashion-mnist[-label-smoothing]", "fashion-mnist")]

    trainer.calls = []
    again = ablate(resume=ablation_id[:6], store=store, resamples=200)
    assert trainer.calls == [] and again.to_dict()["variants"] == result.to_dict()["variants"]
    fresh = ablate("fashion-mnist", seeds=2, techniques=TWO, store=store, new=True, resamples=200)
    assert fresh.ablation_id != ablation_id and len(trainer.calls) == 8


def test_retune_finds_the_shortest_schedule_per_variant(tmp_path, monkeypatch):
    recipe = get_recipe("fashion-mnist").override({"train.epochs": 4})
    trainer = FakeTrainer({"flip": 1.0}, min_epochs={"fashion-mnist": 2.0, "fashion-mnist[baseline]": 100.0})
    monkeypatch.setattr(ablate_mod, "_train", trainer)
    store = RunStore(tmp_path / "runs.sqlite")
    lines = []
    result = ablate(recipe, seeds=2, techniques=["flip"], retune_epochs=True, store=store, resamples=200,
                    progress=lines.append)
    v = {s.name: s for s in result.variants}
    assert v["full"].schedule_epochs == 2.0 and v["full"].retune_reached  # 4 x 0.5
    assert v["baseline"].schedule_epochs == 8.0 and v["baseline"].retune_reached is False  # none on the grid
    assert all(r.schedule_epochs == 2.0 for r in v["full"].runs)
    trials = [c for c in trainer.calls if c[1] == 0 and c[0] == "fashion-mnist"]
    assert len(trials) <= 5  # bisection over 13 lengths, then the seed-0 measurement
    assert result.retune_step == pytest.approx(2 ** 0.25, rel=1e-3)
    assert any("train.epochs = 2" in line for line in lines)
    n = len(trainer.calls)
    ablate(recipe, seeds=2, techniques=["flip"], retune_epochs=True, store=store, resamples=200)
    assert len(trainer.calls) == n  # the search and the runs are all reused on resume


# ---------------------------------------------------------------- end to end, real training on CPU

def test_tiny_ablation_end_to_end_with_interrupt_and_cli_resume(tmp_path, monkeypatch, synthetic_dir, capsys):
    """2 techniques x leave-one-out, 2 seeds, real training: one technique is load-bearing
    (without it the LR is ~0 and no run reaches the target), so two variants never reach."""
    from speedrun.train import hooks

    warm_lr = _technique("warm-lr", "optim", "lr", 0.5, 1e-6)
    store_path = tmp_path / "runs.sqlite"
    real_train, real_eval = ablate_mod._train, hooks.Evaluator.run
    calls = []

    def ctrl_c(self, state):
        raise KeyboardInterrupt

    def ctrl_c_in_third_run(*args, **kwargs):  # as if Ctrl-C were pressed during the third run
        calls.append(args[0].name)
        monkeypatch.setattr(hooks.Evaluator, "run", ctrl_c if len(calls) == 3 else real_eval)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(ablate_mod, "_train", ctrl_c_in_third_run)
    with pytest.raises(AblationInterrupted) as stopped:
        ablate("fashion-mnist", seeds=2, techniques={"label-smoothing": TECHNIQUES["label-smoothing"],
                                                      "warm-lr": warm_lr},
               data=synthetic_dir, target=0.6, budget="1ep", overrides=PINNED, device="cpu",
               store=store_path, latency_samples=20, resamples=500)
    ablation_id = stopped.value.ablation_id
    done = RunStore(store_path).ablation_runs(ablation_id)
    assert [(r["variant"], r["outcome"]) for r in done] == [
        ("full", "reached"), ("baseline", "budget_exhausted"), ("-label-smoothing", "interrupted")]
    assert RunStore(store_path).get_ablation(ablation_id)["status"] == "interrupted"

    from speedrun.ablate import add_parser
    parser = argparse.ArgumentParser(prog="speedrun")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ablate", "--resume", ablation_id, "--json", "--store", str(store_path)])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert len(calls) == 3 + 6  # 8 planned runs: 2 done before the interrupt, the interrupted one and 5 after it
    assert "2 of 8 runs already in the store" in captured.err
    variants = {v["name"]: v for v in result["variants"]}
    assert set(variants) == {"full", "baseline", "-label-smoothing", "-warm-lr"}
    assert all(len(v["runs"]) == 2 for v in variants.values()) and result["complete"]
    for name in ("baseline", "-warm-lr"):  # reported, not dropped
        assert variants[name]["never_reached"] and variants[name]["pass_rate"] == 0.0
        assert 0.0 < variants[name]["best_accuracy"] < 0.6
        assert all(r["outcome"] == "budget_exhausted" for r in variants[name]["runs"])
    for name in ("full", "-label-smoothing"):
        assert variants[name]["pass_rate"] == 1.0 and variants[name]["median_s"] > 0
    assert variants["full"]["latency_s"] is not None and variants["full"]["latency_s"] > 0
    effects = {e["technique"]: e for e in result["attribution"]["effects"]}
    assert effects["warm-lr"]["speedup"]["kind"] == "lower_bound"
    assert effects["label-smoothing"]["speedup"]["kind"] == "estimate"
    (pair,) = result["attribution"]["interactions"]  # with two techniques the baseline is "without both"
    assert pair["ratio"]["kind"] == "unknown"

    rows = RunStore(store_path).list_runs(group=ablation_id, limit=None)
    assert len(rows) == 9 and sum(r["outcome"] == "interrupted" for r in rows) == 1  # kept, not counted
    monkeypatch.setenv("COLUMNS", "200")  # rich tables are 80 wide when not on a terminal
    args = parser.parse_args(["ablate", "--resume", ablation_id, "--store", str(store_path)])
    assert args.func(args) == 0 and len(calls) == 9  # nothing left to run: the table only
    text = capsys.readouterr().out
    for row in ("label-smoothing", "warm-lr", "never reached (best", "baseline", "-warm-lr"):
        assert row in text, text


# ---------------------------------------------------------------- a technique the target needs (issue 22)

def _never_reached_without_tta(ran_without: float):
    """An ablation summary: the full recipe reaches in ~6.45 s; without flip-TTA it never does (its runs
    stop after ``ran_without`` s at 90.9%); without flip it takes twice as long."""
    from speedrun.ablate import RunRecord, summarize

    techniques = ["flip", "flip-tta"]
    variants = [("full", ()), ("baseline", ("flip", "flip-tta")), ("-flip", ("flip",)), ("-flip-tta", ("flip-tta",))]
    times = {"full": 6.45, "baseline": None, "-flip": 12.9, "-flip-tta": None}
    records = {v: [RunRecord(f"{v}{s}", v, s, "reached" if times[v] else "budget_exhausted",
                             None if times[v] is None else times[v] * (1 + 0.01 * s),
                             ran_without if times[v] is None else times[v] * (1 + 0.01 * s),
                             0.909 if times[v] is None else 0.921, 1.75, 1.75) for s in range(3)]
               for v, _ in variants}
    plan = {"techniques": techniques, "mode": "leave-one-out", "seeds": [0, 1, 2], "recipe_name": "fashion-mnist",
            "target": 0.92}
    return summarize("abl", plan, variants, records, schedule={v: 1.75 for v, _ in variants}, resamples=300)


def test_a_technique_without_which_the_target_is_missed_is_needed_never_a_slowdown():
    from speedrun.report.plots import waterfall_steps

    result = _never_reached_without_tta(6.26)  # stopped before the full recipe's time: a bound below 1
    effects = {e.technique: e for e in result.attribution.effects}
    tta = effects["flip-tta"]
    assert tta.needed and tta.speedup.kind == "lower_bound" and tta.speedup.value < 1
    assert tta.text == "needed to reach the target (without it: best 90.9%)"
    assert tta.to_dict()["needed"] and tta.to_dict()["speedup"]["text"] == tta.text
    console = Console(record=True, width=200)
    print_result(result, console)
    text = console.export_text()
    assert "needed to reach the target (without it: best 90.9%)" in text and ">= 0." not in text
    assert "product of single factors (leave-one-out): not computed: flip-tta decides" in text
    assert "the baseline misses the target (best 90.9%)" in text
    steps = waterfall_steps(result)
    assert [s.kind for s in steps] == ["start", "needed", "technique", "end"]  # no slowdown, no "rest" bar
    needed = steps[1]
    assert needed.label == "flip-tta\nneeded" and needed.top == needed.bottom and "90.9%" in needed.note
    assert all(s.bottom <= s.top for s in steps if s.kind == "technique")
    # a bound above 1 says more than "faster": it is kept beside the word
    tta = {e.technique: e for e in _never_reached_without_tta(40.0).attribution.effects}["flip-tta"]
    assert tta.text.startswith("needed to reach the target (without it: best 90.9%); >= 6.")


def test_the_rest_of_the_waterfall_is_drawn_only_when_it_is_more_than_noise(tmp_path, monkeypatch):
    from speedrun.report.plots import rest_of_product, waterfall_png, waterfall_steps

    monkeypatch.setattr(ablate_mod, "_train", FakeTrainer({"flip": 2.0, "label-smoothing": 1.5}))
    result = ablate("fashion-mnist", seeds=3, techniques=TWO, store=RunStore(tmp_path / "runs.sqlite"),
                    resamples=300)  # the factors multiply to the total exactly
    rest, why = rest_of_product(result)
    assert rest is None and "interval includes 1" in why
    assert "interactions" not in [s.kind for s in waterfall_steps(result)] and waterfall_png(result)
