"""Built-in recipes: frozen records naming a function that returns a Recipe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from speedrun.config import ConfigError, Recipe
from speedrun.recipes import fashion_mnist


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
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; built-in recipes: {', '.join(RECIPES)} "
                          "(or give a .toml file)")
    return RECIPES[name].build()
