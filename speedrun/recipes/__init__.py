"""Built-in recipes: frozen records naming a function that returns a Recipe."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from speedrun.config import ConfigError, Recipe, read_toml
from speedrun.recipes import cifar10, fashion_mnist, imagenet


@dataclass(frozen=True)
class RecipeSpec:
    name: str
    build: Callable[[], Recipe]
    description: str


RECIPES: dict[str, RecipeSpec] = {spec.name: spec for spec in (
    RecipeSpec("fashion-mnist", fashion_mnist.fashion_mnist,
               "the CPU default: fast conv net to 92% on Fashion-MNIST"),
    RecipeSpec("baseline", fashion_mnist.baseline,
               "what a typical project does (PyTorch examples' MNIST script): the control for speedups"),
    RecipeSpec("cifar10-94", cifar10.cifar10_94,
               "airbench94's recipe for a GPU: CIFAR-10 to 94% in about 10 epochs"),
    RecipeSpec("cifar10-cpu", cifar10.cifar10_cpu,
               "CIFAR-10 to 85% on a 2-core CPU: airbench's design at a quarter of the width"),
    RecipeSpec("cifar10-cpu-90", cifar10.cifar10_cpu_90,
               "CIFAR-10 to 90.6% (airbench94's accuracy on the JPEG copy) on a CPU: cifar10-cpu at 64/256/256"),
    RecipeSpec("imagenet-resnet50", imagenet.imagenet_resnet50,
               "ResNet-50 to 75.9% top-1 (MLPerf's target) on an image-folder tree given with --data"),
    RecipeSpec("imagewoof", imagenet.imagewoof,
               "Imagewoof (fast.ai's 10 dog breeds) from scratch on a CPU: ResNet-18, aspect-kept crops, FixRes"),
)}


def get_recipe(name: str) -> Recipe:
    if name == "sized":
        raise ConfigError("recipe 'sized' is made from a dataset's shape when a run starts: speedrun train "
                          "--data PATH [--recipe sized], or speedrun.train('sized', data=PATH)")
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; built-in recipes: {', '.join(RECIPES)} "
                          "(or give a .toml file)")
    return RECIPES[name].build()


def load_toml(path: str | Path) -> Recipe:
    """Read a recipe from TOML: optional ``base = "name"`` then sections overriding it.

    ``base`` defaults to the built-in ``fashion-mnist`` recipe; keys not given keep its values.

    >>> load_toml("my.toml").train.epochs  # doctest: +SKIP
    """
    values = read_toml(path)
    base = values.pop("base", "fashion-mnist")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a recipe name; got {base!r}")
    return get_recipe(base).override(values)


def dump_toml(recipe: Recipe, *, base: str = "fashion-mnist", header: Sequence[str] = ()) -> str:
    """``recipe`` as TOML that ``load_toml`` reads back as the same recipe: ``base = "name"`` and every
    value that differs from that built-in recipe (``header`` lines become comments at the top).

    >>> dump_toml(get_recipe("fashion-mnist").override({"train.epochs": 2.0})).splitlines()[-2:]
    ['[train]', 'epochs = 2.0']
    """
    ref = get_recipe(base).to_dict()
    lines = [f"# {line}" for line in header]
    lines.append(f"base = {_toml_value(base)}")
    sections = []
    for key, value in recipe.to_dict().items():
        if key == "name":
            continue  # load_toml names the recipe after its file
        if isinstance(value, dict):
            changed = [f"{k} = {_toml_value(v)}" for k, v in value.items() if ref[key].get(k) != v]
            if changed:
                sections += ["", f"[{key}]", *changed]
        elif ref.get(key) != value:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines + sections) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if value is None:
        return '"none"'  # the recipe's optional numbers read "none" as None
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string: JSON's escapes are TOML's
