"""argparse value types and argument parsing shared by the subcommands."""
from __future__ import annotations

import argparse
from typing import Sequence

from speedrun.config import ConfigError


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def target_fraction(text: str) -> float:
    """An accuracy target in (0, 1], also accepted as a percentage (``92%``)."""
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"target must be in (0, 1] (or a percentage); got {text}")
    return value


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """`--set KEY=VALUE` items as a dict of recipe overrides (checked against the recipe later)."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects section.key=value; got {item!r}")
        values[key.strip()] = value.strip()
    return values


def technique_names(text: str) -> list[str]:
    """``--without a,b``: catalog technique names (checked against the catalog when the run is built)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give one or more technique names, comma-separated")
    return names
