"""Built-in recipes: frozen records naming a function that returns a Recipe."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
    RecipeSpec("imagenet-resnet50", imagenet.imagenet_resnet50,
               "ResNet-50 to 75.9% top-1 (MLPerf's target) on an image-folder tree given with --data"),
    RecipeSpec("imagewoof", imagenet.imagewoof,
               "Imagewoof (fast.ai's 10 dog breeds) from scratch on a CPU: ResNet-18, aspect-kept crops, FixRes"),
)}


def get_recipe(name: str) -> Recipe:
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
