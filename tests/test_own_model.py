"""A user's own model: from the CLI (--model package.module:factory) and from Python (a factory or a
module), checked before the clock starts; techniques that need structure it lacks are refused by name."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import speedrun
from speedrun.cli import main
from speedrun.config import ConfigError
from tests.conftest import TINY
from tests.own_models import tiny_net

# The default recipe whitens its first conv and freezes the stem: a plain user model has neither hook.
PLAIN = ["--without", "patch-whitening,stem-freezing"]
FAST = {"train.epochs": "3", "train.batch_size": "128", "eval.every_epochs": "1", "eval.start_frac": "0",
        "optim.lr_batch_size": "1024"}


def _sets(values: dict) -> list[str]:
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def test_cli_trains_an_importable_factory_and_records_it(synthetic_dir, capsys):
    code = main(["train", "--data", str(synthetic_dir), "--model", "tests.own_models:tiny_net", *PLAIN,
                 "--target", "0.6", "--json", *_sets(FAST)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["reached"], result["detail"]
    assert result["flops_per_image"] > 0 and result["mfu"] > 0  # FLOPs and MFU work on any module
    main(["runs", "--json"])
    run, = json.loads(capsys.readouterr().out)
    assert run["recipe"]["model"]["name"] == "tests.own_models:tiny_net"
    assert run["recipe"]["model"]["stem"] == "conv" and run["recipe"]["model"]["stem_train_frac"] == 1.0


def test_python_takes_a_factory_or_a_module_trained_in_place(synthetic_dir):
    by_factory = speedrun.train(model=tiny_net, data=synthetic_dir, store=None, target=0.6,
                                without=("patch-whitening", "stem-freezing"), overrides=FAST)
    assert by_factory.reached and by_factory.recipe.model.name == "tests.own_models:tiny_net"
    assert not by_factory.model.training  # handed back ready for inference

    net = tiny_net(in_channels=1, num_classes=4, image_size=(28, 28))
    before = net[0].weight.detach().clone()
    result = speedrun.train(model=net, data=synthetic_dir, store=None, target=0.45,
                            without=("patch-whitening", "stem-freezing"), overrides=FAST)
    assert result.reached and result.model is net and not torch.equal(net[0].weight, before)


def test_hooks_of_ones_own_see_every_step(synthetic_dir):
    class CountSteps:
        steps = 0

        def after_step(self, state):
            self.steps += 1

    counter = CountSteps()
    result = speedrun.train(data=synthetic_dir, store=None, stop_at_target=False, hooks=[counter],
                            overrides=TINY)
    assert counter.steps == result.steps > 0


@pytest.mark.parametrize("model, message", [
    ("no_such_package.nets:make", "cannot import 'no_such_package.nets'"),
    ("tests.own_models:missing", "'tests.own_models' has no attribute 'missing'"),
    ("tests.own_models:NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
    ("tests.own_models:not_a_module", "returned a dict, not a torch.nn.Module"),
    ("tests.own_models:positional_only", "it is called with these three keywords"),
    ("tests.own_models:three_classes", "returns (2, 3) for a batch of 2 images; expected logits of shape (2, 4)"),
])
def test_bad_factories_are_refused_in_one_line_before_any_run(synthetic_dir, capsys, model, message):
    code = main(["train", "--data", str(synthetic_dir), "--model", model, *PLAIN])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err.replace("\n", " ") and err.startswith("speedrun: error:")
    main(["runs", "--json"])
    assert json.loads(capsys.readouterr().out) == []  # refused before a run was recorded


def test_techniques_needing_structure_are_refused_naming_the_missing_piece(synthetic_dir, capsys):
    # A recipe the user chose is refused; the data-sized default (no --recipe) leaves them out instead (test_sized).
    code = main(["train", "--recipe", "fashion-mnist", "--data", str(synthetic_dir), "--model", "tests.own_models:tiny_net"])
    err = capsys.readouterr().err
    assert code == 2 and "patch-whitening" in err and "init_from_data" in err
    assert "--without patch-whitening" in err
    with pytest.raises(ConfigError, match="zero-init-residual .*marked as the end of a residual branch"):
        speedrun.train(model=tiny_net, data=synthetic_dir, store=None, without=("patch-whitening", "stem-freezing"),
                       overrides={"model.zero_init_residual": True})


def test_unknown_technique_names_are_listed():
    with pytest.raises(ConfigError, match="unknown technique 'flips'; known: one-cycle"):
        speedrun.train(without=("flips",), store=None)


def test_resnet50_passes_the_zero_init_check_that_a_plain_convnet_fails():
    from speedrun.models import build_model
    from speedrun.recipes import get_recipe
    from speedrun.techniques.registry import check_model

    recipe = get_recipe("imagenet-resnet50").override({"model.widths": "4,4,4,4", "model.zero_init_residual": True})
    check_model(recipe, build_model(recipe.model, in_channels=3, num_classes=10, image_size=(32, 32)),
                model_name="resnet50")
    with pytest.raises(ConfigError, match="zero-init-residual"):
        check_model(recipe, nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), model_name="plain")


def test_a_batch_larger_than_the_training_set_is_refused_before_the_clock(synthetic_dir, capsys):
    code = main(["train", "--data", str(synthetic_dir), "--set", "train.batch_size=5000"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "train.batch_size 5000 exceeds the 1,024 training images" in err
    assert len(err.splitlines()) == 1
    main(["runs", "--json"])
    assert json.loads(capsys.readouterr().out) == []  # nothing recorded, no block of zero metrics
