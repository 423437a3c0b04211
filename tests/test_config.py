import pytest

from speedrun.config import ConfigError, Recipe, from_dict
from speedrun.recipes import RECIPES, get_recipe, load_toml


def test_overrides_are_parsed_by_field_type():
    r = Recipe().override({"train.batch_size": "512", "optim.lr": "0.5", "train.channels_last": "false",
                           "model.widths": "16, 32,64", "model.pools": "", "optim.name": "adamw", "target": 0.9})
    assert r.train.batch_size == 512 and r.optim.lr == 0.5 and r.train.channels_last is False
    assert r.model.widths == (16, 32, 64) and r.optim.name == "adamw" and r.target == 0.9


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*train\.epochs.*train\.batch_size"):
        Recipe().override({"train.epoch": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'trian.epochs'; valid keys here: name, description, target"):
        Recipe().override({"trian.epochs": 3})


@pytest.mark.parametrize("key,value,message", [
    ("train.batch_size", "lots", "expects an integer"),
    ("train.batch_size", "2.5", "expects an integer"),
    ("train.channels_last", "maybe", "expects true/false"),
    ("optim.name", "lion", "must be one of 'sgd', 'adamw', 'adadelta'"),
    ("target", "1.5", "target must be in"),
    ("target", "0", "target must be in"),
    ("train.epochs", "-1", "train.epochs must be > 0"),
    ("train", "3", "is a section"),
    ("model.stem", "patchy", "must be one of 'conv', 'whiten', 'small'"),
    ("model.whiten_eps", "0", "model.whiten_eps > 0"),
    ("model.stem_kernel", "0", "model.stem_kernel must be >= 1"),
    ("data.max_size", "-1", "data.max_size must be >= 0"),
])
def test_bad_values_fail_with_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        Recipe().override({key: value})


def test_toml_recipe_overrides_its_base(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('base = "baseline"\ntarget = 0.9\n[train]\nepochs = 3\n[model]\nname = "mnist-net"\n')
    r = load_toml(path)
    assert r.name == "mine" and r.target == 0.9 and r.train.epochs == 3
    assert r.optim.name == "adadelta"  # inherited from the base


def test_toml_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_toml(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        load_toml(unknown)


def test_round_trip_through_dict():
    for name in RECIPES:
        r = get_recipe(name)
        assert from_dict(r.to_dict()) == r


def test_a_stored_recipe_with_a_replaced_key_still_loads():
    stored = get_recipe("cifar10-cpu").to_dict()
    del stored["model"]["stem_train_frac"]
    stored["model"]["whiten_bias_trainable"] = False  # how runs before stem_train_frac recorded it
    assert from_dict(stored) == get_recipe("cifar10-cpu")
    stored["model"]["whiten_bias_trainable"] = True
    assert from_dict(stored).model.stem_train_frac == 1.0


def test_unknown_recipe_lists_the_built_in_ones():
    with pytest.raises(ConfigError, match="built-in recipes: fashion-mnist, baseline"):
        get_recipe("imagenet-in-5s")
