"""``speedrun compare``: grouping stored runs and splitting differences into hardware and software parts."""
from __future__ import annotations

import argparse
import json

import pytest

from speedrun.compare import add_parser, compare, parse_keys, recipe_key
from speedrun.config import ConfigError
from speedrun.store import RunStore

CPU = {"device_name": "AMD EPYC (2 cores)", "precision": "fp32", "threads": 2, "torch_version": "2.13.0+cpu"}
GPU = {"device_name": "NVIDIA H100", "precision": "bf16", "threads": 16, "torch_version": "2.13.0+cu128"}
SLOW = {"name": "slow", "target": 0.9, "data": {"source": "/a/fashion-mnist"}, "train": {"epochs": 8}}
FAST = {"name": "fast", "target": 0.9, "data": {"source": "/a/fashion-mnist"}, "train": {"epochs": 4}}


def add_runs(store: RunStore, recipe: dict, env: dict, times: list[float | None], *, prefix: str) -> None:
    for i, t in enumerate(times):
        run_id = f"{prefix}{i}"
        store.start_run(run_id=run_id, recipe_name=recipe["name"], recipe=recipe, env=env, target=0.9, seed=i)
        store.finish_run(run_id, outcome="reached" if t is not None else "budget_exhausted", detail="",
                         summary={"time_to_accuracy_s": t, "best_accuracy": 0.91 if t else 0.8,
                                  "total_time_s": t or 500.0}, curve=[])


def jitter(median: float, n: int = 5) -> list[float]:
    return [median * f for f in (0.97, 0.99, 1.0, 1.01, 1.03)[:n]]


@pytest.fixture
def four_groups(tmp_path) -> RunStore:
    """GPU 8x faster than CPU, recipe "fast" 2x faster than "slow", effects multiplicative."""
    store = RunStore(tmp_path / "runs.sqlite")
    add_runs(store, SLOW, CPU, jitter(400.0), prefix="cs")
    add_runs(store, FAST, CPU, jitter(200.0), prefix="cf")
    add_runs(store, SLOW, GPU, jitter(50.0), prefix="gs")
    add_runs(store, FAST, GPU, jitter(25.0), prefix="gf")
    return store


def test_split_into_hardware_and_software(four_groups):
    c = compare(four_groups.list_runs(limit=None), by=("device", "recipe"), resamples=500)
    assert [g.key[0] for g in c.groups] == ["NVIDIA H100", "NVIDIA H100", "AMD EPYC (2 cores)", "AMD EPYC (2 cores)"]
    assert c.groups[0].key[1].startswith("fast@") and c.groups[0].median_s == 25.0
    worst = c.splits[-1]  # slow recipe on the CPU against fast recipe on the GPU
    assert worst.total.value == pytest.approx(16.0)
    assert worst.hardware.value == pytest.approx(8.0) and worst.software.value == pytest.approx(2.0)
    assert worst.hardware.low <= 8.0 <= worst.hardware.high
    assert worst.path_disagreement.value == pytest.approx(1.0) and "geometric mean" in worst.note
    same_hw = next(s for s in c.splits if s.group[0] == "NVIDIA H100")
    assert same_hw.hardware.value == 1.0 and same_hw.software.value == pytest.approx(2.0)


def test_split_with_one_cross_group_or_none(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    add_runs(store, FAST, GPU, jitter(25.0), prefix="gf")
    add_runs(store, SLOW, CPU, jitter(400.0), prefix="cs")
    c = compare(store.list_runs(limit=None), by=("device", "recipe"), resamples=200)
    (split,) = c.splits
    assert split.hardware is None and split.software is None and "no split" in split.note
    add_runs(store, FAST, CPU, jitter(200.0), prefix="cf")  # the reference recipe on the slow hardware
    c = compare(store.list_runs(limit=None), by=("device", "recipe"), resamples=200)
    split = c.splits[-1]
    assert split.hardware.value == pytest.approx(8.0) and split.software.value == pytest.approx(2.0)
    assert split.path_disagreement is None and "reference recipe" in split.note


def test_unreached_groups_are_kept_and_bounded(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    add_runs(store, FAST, CPU, jitter(200.0, 3), prefix="ok")
    add_runs(store, SLOW, CPU, [None, None, 300.0], prefix="no")
    store.start_run(run_id="live", recipe_name="fast", recipe=FAST, env=CPU, target=0.9, seed=9)  # unfinished
    c = compare(store.list_runs(limit=None), by=("device", "recipe"), resamples=200)
    assert len(c.groups) == 2 and sum(len(g.run_ids) for g in c.groups) == 6
    slow = c.groups[1]
    assert slow.median_s is None and slow.sample.pass_rate == pytest.approx(1 / 3)
    (split,) = c.splits
    assert split.total.kind == "lower_bound" and split.total.value == pytest.approx(500.0 / 198.0)  # ran 500 s; the other median is 198 s


def test_recipe_key_ignores_where_the_data_lives_but_not_what_the_recipe_is():
    a = {"recipe_name": "r", "recipe": {**FAST, "data": {"source": "/home/x/fashion-mnist"}}}
    b = {"recipe_name": "r", "recipe": {**FAST, "data": {"source": "/srv/y/fashion-mnist"}}}
    c = {"recipe_name": "r", "recipe": {**FAST, "train": {"epochs": 5}}}
    assert recipe_key(a) == recipe_key(b) != recipe_key(c)


def test_a_recipe_keys_alike_before_and_after_a_field_was_added():
    from speedrun.recipes import get_recipe

    now = get_recipe("cifar10-cpu").to_dict()
    before = {**now, "model": {k: v for k, v in now["model"].items() if k != "block_train_fracs"}}
    assert recipe_key({"recipe_name": "cifar10-cpu", "recipe": before}) == recipe_key(
        {"recipe_name": "cifar10-cpu", "recipe": now})
    changed = {**now, "model": {**now["model"], "block_train_fracs": [0.5]}}
    assert recipe_key({"recipe_name": "cifar10-cpu", "recipe": changed}) != recipe_key(
        {"recipe_name": "cifar10-cpu", "recipe": now})


def test_cli_json_and_bad_keys(four_groups, capsys):
    parser = argparse.ArgumentParser(prog="speedrun")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--by", "device,recipe_name", "--json", "--store", str(four_groups.path)])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["groups"]) == 4 and out["splits"][-1]["hardware"]["value"] == pytest.approx(8.0)
    args = parser.parse_args(["compare", "cs0", "gs1", "gs2", "--by", "device", "--store", str(four_groups.path)])
    assert args.func(args) == 0 and "split into hardware" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="unknown --by key 'gpu'; valid keys: device"):
        parse_keys("device,gpu")
    assert compare([], by=["device"]).groups == () and compare([], by=["device"]).splits == ()


# ---------------------------------------------------------------- names and like with like (issue 22)

def test_same_named_recipes_are_told_apart_by_their_values(tmp_path, capsys):
    from speedrun.compare import recipe_labels

    store = RunStore(tmp_path / "runs.sqlite")
    add_runs(store, FAST, CPU, jitter(200.0, 3), prefix="f4")
    add_runs(store, {**FAST, "train": {"epochs": 3}}, CPU, jitter(150.0, 3), prefix="f3")
    add_runs(store, SLOW, CPU, jitter(400.0, 3), prefix="s8")
    c = compare(store.list_runs(limit=None), by=("recipe",), resamples=200)
    assert [g.names[0] for g in c.groups] == ["fast[train.epochs=3]", "fast[train.epochs=4]", "slow"]
    assert c.groups[0].to_dict(c.by)["shown"] == {"recipe": "fast[train.epochs=3]"} and not c.notes
    parser = argparse.ArgumentParser(prog="speedrun")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--by", "recipe", "--store", str(store.path)])
    assert args.func(args) == 0
    assert "fast[train.epochs=3]" in capsys.readouterr().out  # escaped: rich would drop a "tag"

    many = [{"id": f"m{i}", "recipe_name": "m", "recipe": {"optim": {"lr": lr, "wd": i, "momentum": i, "x": i}}}
            for i, lr in enumerate((0.1, 0.2))]
    labels, notes = recipe_labels(many)
    assert sorted(labels.values()) == ["m[optim.lr=0.1, optim.momentum=0, optim.wd=0, +1 more]",
                                       "m[optim.lr=0.2, optim.momentum=1, optim.wd=1, +1 more]"]
    assert notes[0].endswith("optim.lr=0.1, optim.momentum=0, optim.wd=0, optim.x=0")


def test_only_runs_on_one_dataset_to_one_target_are_compared(tmp_path, capsys):
    store = RunStore(tmp_path / "runs.sqlite")
    add_runs(store, FAST, CPU, jitter(200.0, 3), prefix="fm")
    add_runs(store, {**SLOW, "data": {"source": "cifar10"}}, CPU, jitter(90.0, 2), prefix="cf")
    c = compare(store.list_runs(limit=None), by=("recipe",), resamples=200)
    assert c.dataset == "fashion-mnist" and c.target == 0.9 and [g.key[0].split("@")[0] for g in c.groups] == ["fast"]
    assert c.left_out == ({"dataset": "cifar10", "target": 0.9, "runs": ["cf1", "cf0"]},) and not c.splits
    c = compare(store.list_runs(limit=None), by=("recipe",), dataset="cifar10", resamples=200)
    assert [g.names[0] for g in c.groups] == ["slow"] and c.left_out[0]["dataset"] == "fashion-mnist"
    parser = argparse.ArgumentParser(prog="speedrun")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--store", str(store.path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "runs on fashion-mnist to 90% grouped by" in out
    assert "left out: 2 runs on cifar10 to 90%, another dataset or target (compare them with --data cifar10 " \
           "--target 90%)" in out
    args = parser.parse_args(["compare", "--data", "imagenet", "--store", str(store.path)])
    with pytest.raises(ConfigError, match="no finished runs on imagenet to any target; 2 runs on cifar10 to 90%; 3 runs"):
        args.func(args)
