import json
import math

import pytest
import torch

import speedrun
from speedrun import data as datalib
from speedrun.config import ConfigError, validate
from speedrun.measure import flops
from speedrun.models import build_model
from speedrun.recipes import sized
from speedrun.recipes.sized import sized_recipe
from speedrun.store import RunStore

from conftest import synthetic_images, write_idx_dataset

SHAPES = [  # (channels, image_size, train_images, num_classes)
    (1, (8, 8), 60_000, 10),
    (1, (28, 28), 1_000, 10),
    (3, (32, 32), 50_000, 10),
    (3, (64, 64), 9_000, 10),
    (3, (16, 16), 2_000, 2),
    (1, (24, 40), 5_000, 3),  # not square: sized by the shorter side
    (3, (5, 5), 40, 2),  # too small to pool, fewer images than a default batch
    (1, (1, 1), 7, 2),
]


def schedule_steps(recipe, train_images: int) -> int:
    """Optimizer steps of a run, as the trainer counts them (drop-last batches, ceil of epochs x steps/epoch)."""
    return math.ceil(recipe.train.epochs * (train_images // recipe.train.batch_size))


@pytest.mark.parametrize("channels,image_size,train_images,num_classes", SHAPES)
def test_every_shape_gives_a_valid_recipe_with_a_batch_that_fits(channels, image_size, train_images, num_classes):
    r = sized_recipe(channels=channels, image_size=image_size, train_images=train_images, num_classes=num_classes,
                     source="/data/mine")
    validate(r)
    assert r.data.source == "/data/mine" and r.name == "sized"
    assert 1 <= r.train.batch_size <= train_images
    assert train_images // r.train.batch_size >= 1  # at least one full batch: the loader drops the last
    assert f"{train_images:,} training images" in r.description
    assert r.target == 1.0  # no known target: the whole schedule runs
    assert r.model.name == "convnet" and len(r.model.widths) == len(r.model.pools) + 2


@pytest.mark.parametrize("channels,image_size,train_images,num_classes", SHAPES)
def test_schedule_is_whole_steps_with_a_floor(channels, image_size, train_images, num_classes):
    r = sized_recipe(channels=channels, image_size=image_size, train_images=train_images, num_classes=num_classes)
    steps = sized.schedule_steps(train_images)
    assert steps >= sized.MIN_STEPS
    assert schedule_steps(r, train_images) == steps  # epochs carry the step count exactly


def test_small_sets_get_more_epochs_and_never_fewer_images_seen():
    seen = []
    for n in (500, 1_000, 3_000, 10_000, 30_000, 60_000, 200_000):
        r = sized_recipe(channels=1, image_size=(28, 28), train_images=n, num_classes=10)
        seen.append((r.train.epochs, sized.schedule_steps(n) * r.train.batch_size))
    epochs, images = zip(*seen)
    assert list(epochs) == sorted(epochs, reverse=True)
    assert list(images) == sorted(images)


@pytest.mark.parametrize("channels,side", [(1, 8), (1, 28), (3, 32), (3, 64), (3, 5)])
def test_model_builds_and_ends_on_a_small_feature_map(channels, side):
    r = sized_recipe(channels=channels, image_size=(side, side), train_images=5_000, num_classes=7)
    model = build_model(r.model, in_channels=channels, num_classes=7, image_size=(side, side))
    x = torch.randn(4, channels, side, side)
    model.init_from_data(x)  # the whitened stem: widths[0] fits the patches' dimensions
    features = model.body(x)
    assert model(x).shape == (4, 7)
    final = features.shape[-1]
    assert final <= 5 and (final >= 3 or final == side)  # a pool more would leave 1-2 px


def evaluated_steps(recipe, train_images: int) -> list[int]:
    """The steps the trainer's Evaluator evaluates at, from the recipe's eval section (speedrun.train.run)."""
    spe = train_images // recipe.train.batch_size
    steps = schedule_steps(recipe, train_images)
    every = max(1, round(recipe.eval.every_epochs * spe))
    start = math.ceil(recipe.eval.start_frac * steps)
    return [s for s in range(1, steps + 1) if s >= start and (s // every > (s - 1) // every or s == steps)]


@pytest.mark.parametrize("train_images,test_images", [(1_000, 10_000), (20_000, 4_000), (50_000, 10_000),
                                                      (200_000, 10_000), (300, 0)])
def test_evaluations_cost_a_bounded_share_and_the_last_one_is_at_the_end(train_images, test_images):
    r = sized_recipe(channels=1, image_size=(28, 28), train_images=train_images, num_classes=10,
                     test_images=test_images)
    at = evaluated_steps(r, train_images)
    steps = schedule_steps(r, train_images)
    assert at[-1] == steps and len(at) == sized.evaluations(train_images, test_images)
    assert at[0] > sized.EVAL_START_FRAC * steps
    if len(at) > 1:  # each evaluation forwards the test set twice (flip-TTA): ~2/3 of a training image each
        share = len(at) * test_images * sized.TTA_COST / (steps * r.train.batch_size)
        assert share <= sized.EVAL_SHARE


def test_bad_shapes_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="train_images"):
        sized_recipe(channels=1, image_size=(28, 28), train_images=0, num_classes=10)
    with pytest.raises(ConfigError, match="num_classes"):
        sized_recipe(channels=1, image_size=(28, 28), train_images=100, num_classes=1)
    with pytest.raises(ConfigError, match="channels"):
        sized_recipe(channels=0, image_size=(28, 28), train_images=100, num_classes=2)


def test_sized_recipe_trains_well_above_chance(tmp_path, monkeypatch):
    """End to end through speedrun.train on 12 px gratings; the schedule is cut to 40 steps to stay fast."""
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: 1e11)  # seconds of matmuls, not ours
    train_x, train_y = synthetic_images(1024, classes=4, size=12, seed=0)
    test_x, test_y = synthetic_images(256, classes=4, size=12, seed=1)
    data = write_idx_dataset(tmp_path / "gratings", train_x, train_y, test_x, test_y)
    images = datalib.load_prepared(datalib.prepare(datalib.resolve(data)).directory, mmap=True)
    recipe = sized.sized_for(images, source=str(data))
    assert recipe == sized_recipe(channels=1, image_size=(12, 12), train_images=1024, num_classes=4, test_images=256,
                                  source=str(data))
    short = 40 / (1024 // recipe.train.batch_size)
    threads = torch.get_num_threads()
    try:  # one thread: on a busy 2-core machine two OpenMP threads spend most of a step waiting for each other
        result = speedrun.train(recipe, data=data, store=None, stop_at_target=False, train__epochs=short,
                                eval__start_frac=1.0, threads=1)
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 40 and result.outcome == "completed"  # no target: the schedule runs to its end
    assert result.final_accuracy >= 0.8  # chance: 0.25


# ---- wired into train: `speedrun train --data PATH` without --recipe, and speedrun.train("sized", ...)

def _gratings(tmp_path, n: int = 600, size: int = 12):
    train_x, train_y = synthetic_images(n, classes=4, size=size, seed=0)
    test_x, test_y = synthetic_images(200, classes=4, size=size, seed=1)
    return write_idx_dataset(tmp_path / "gratings", train_x, train_y, test_x, test_y)


def test_train_sizes_the_recipe_from_the_data_and_completes_without_a_target(tmp_path, monkeypatch):
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: 1e11)
    data = _gratings(tmp_path)
    result = speedrun.train("sized", data=data, store=tmp_path / "runs.sqlite", threads=1, train__epochs=2)
    expected = sized_recipe(channels=1, image_size=(12, 12), train_images=600, num_classes=4, test_images=200,
                            source=str(data))
    assert result.recipe.model == expected.model and result.recipe.train.batch_size == expected.train.batch_size
    assert result.recipe.train.epochs == 2 and "then set: train.epochs=2" in result.recipe.description
    # No target: the whole (shortened) schedule runs, however high the accuracy, and nothing is "reached".
    assert result.outcome == "completed" and result.time_to_accuracy_s is None
    assert result.steps == math.ceil(2 * (600 // expected.train.batch_size))
    assert result.final_accuracy is not None and result.prepare_s > 0  # prepared once, its time kept
    run = RunStore(tmp_path / "runs.sqlite").get_run(result.run_id)
    assert run["outcome"] == "completed" and run["recipe_name"] == "sized"
    # A target given stops the clock at it, as with any recipe.
    reached = speedrun.train("sized", data=data, store=None, threads=1, train__epochs=2, target=0.5)
    assert reached.outcome == "reached" and reached.time_to_accuracy_s is not None


def test_sized_leaves_out_what_a_users_model_cannot_host(tmp_path, monkeypatch):
    """A default recipe adapts to the user's model; a recipe the user chose is refused instead."""
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: 1e11)
    data = _gratings(tmp_path)

    def net(in_channels, num_classes, image_size):
        return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 8, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, num_classes))

    result = speedrun.train("sized", model=net, data=data, store=None, threads=1, train__epochs=1)
    assert result.outcome == "completed"
    assert "left out for model" in result.recipe.description and "patch-whitening" in result.recipe.description
    assert result.recipe.model.stem != "whiten"
    with pytest.raises(ConfigError, match="patch-whitening.*--without patch-whitening"):
        speedrun.train(result.recipe.override({"model.stem": "whiten"}), model=net, data=data, store=None)


def test_cli_defaults_to_sized_for_data_of_ones_own(tmp_path, monkeypatch, capsys):
    from speedrun.cli import main

    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: 1e11)
    data = str(_gratings(tmp_path))
    assert main(["train", "--data", data, "--threads", "1", "--set", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert "no --recipe: the recipe is sized from" in out and "completed its 1 epochs" in out
    assert "final accuracy" in out and "evaluations" in out and "time-to-accuracy" not in out
    assert main(["runs"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "sized" in line)
    assert "completed" in row and "%" not in row.split("completed")[1].split("│")[1]  # no target shown
    assert main(["recipes", "sized", "--data", data, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["batch_size"] == sized.batch_size_for(600)
    # Bad input: one line, before anything trains.
    assert main(["recipes", "sized"]) == 2
    assert "give it with --data PATH" in capsys.readouterr().err
    assert main(["train", "--data", data, "--set", "train.epoch=1"]) == 2
    assert "unknown key 'train.epoch'" in capsys.readouterr().err
    assert sized.default_recipe(None) == sized.default_recipe("fashion-mnist") == "fashion-mnist"


def test_a_run_past_the_threshold_measures_the_peak_again(tmp_path, monkeypatch):
    """Runs long enough for their MFU to matter re-read the matmul peak (keeping the best), short ones don't."""
    from speedrun.train import run

    readings = []
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: readings.append(1) or 1e11)
    monkeypatch.setenv("SPEEDRUN_HOME", str(tmp_path / "home"))
    data = _gratings(tmp_path)
    for _ in range(2):
        speedrun.train("sized", data=data, store=None, threads=1, train__epochs=1)
    assert len(readings) == 1  # short runs: measured once, then cached
    monkeypatch.setattr(run, "REMEASURE_PEAK_AFTER_S", 0.0)
    speedrun.train("sized", data=data, store=None, threads=1, train__epochs=1)
    assert len(readings) == 2
