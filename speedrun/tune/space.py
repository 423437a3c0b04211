"""Search spaces: which recipe keys ``speedrun tune`` varies, over which ranges.

A space is a tuple of ``Param`` records, one per recipe key. The default space of a recipe is built
around its own values (so it exists for every recipe, built-in or TOML): the LR and weight decay
within 3x and 4x of the recipe's on a log scale, momentum, label smoothing, warm-up fraction, the
schedule's length (0.5-1.25x), batch size (half, same, double), the widths (0.75x, 1x, 1.25x, the
first conv kept when it is a whitening stem), Muon's LR and momentum when it uses Muon, and the
progressive-resizing start when it resizes. A space file (TOML) replaces it, one table per key::

    [optim.lr]            # a float range; log = true samples it log-uniformly
    low = 0.2
    high = 2.0
    log = true

    [train.batch_size]    # a list of values (any type the key takes)
    choices = [128, 256, 512]

    [train.epochs]        # step: a grid
    low = 1.0
    high = 2.5
    step = 0.25
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from speedrun.config import ConfigError, Recipe

# Keys a search must not vary: what the study is judged by and on.
RESERVED = ("name", "description", "target", "data.source", "data.val_frac", "eval.split")
SPEC_KEYS = frozenset({"low", "high", "log", "step", "choices"})


@dataclass(frozen=True)
class Param:
    """One searched recipe key: a range (``low``..``high``, optionally ``log`` or on a ``step`` grid) or
    ``choices``. Values are in the recipe's units; tuples (widths) are given as "16,32,64" strings."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def distribution(self, recipe: Recipe):
        """The Optuna distribution: int or float by the key's type, categorical for choices."""
        import optuna.distributions as d

        if self.choices:
            return d.CategoricalDistribution(list(self.choices))
        if key_type(recipe, self.key) is int:
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)


def key_type(recipe: Recipe, key: str) -> Any:
    """The declared type of a recipe key (``optim.lr`` -> float); ConfigError naming the valid keys
    when there is no such key or it names a section."""
    obj: Any = recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names:
            prefix = ".".join(parts[:i])
            valid = ", ".join(f"{prefix}.{n}" if prefix else n for n in sorted(names))
            raise ConfigError(f"unknown parameter {key!r} in the search space; valid here: {valid}")
        hint = typing.get_type_hints(type(obj))[part]
        obj = getattr(obj, part)
        if i < len(parts) - 1 and not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown parameter {key!r} in the search space: {'.'.join(parts[:i + 1])} is not a section")
    if dataclasses.is_dataclass(obj):
        raise ConfigError(f"search-space parameter {key!r} is a section; name one of its keys, "
                          f"e.g. {key}.{dataclasses.fields(obj)[0].name}")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # float | None: the number
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_space(recipe: Recipe, space: Sequence[Param], *, where: str = "search space") -> None:
    """Refuse what no search could use, one line naming the key: an unknown or reserved key, a range
    that is empty or inverted, a log range through 0, a grid step that does not fit, an empty list of
    choices, or a value the recipe rejects at either end of a range or among the choices."""
    if not space:
        raise ConfigError(f"{where}: no parameters to search")
    seen = set()
    for p in space:
        if p.key in RESERVED:
            raise ConfigError(f"{where}: {p.key} cannot be searched (the study is judged by it); "
                              f"searchable keys are the recipe's others")
        if p.key in seen:
            raise ConfigError(f"{where}: {p.key} is given twice")
        seen.add(p.key)
        kind = key_type(recipe, p.key)
        if p.choices or (p.low is None and p.high is None):
            if not p.choices:
                raise ConfigError(f"{where}: {p.key}: give low and high, or a non-empty list of choices")
            values = list(p.choices)
        else:
            if kind not in (int, float):
                raise ConfigError(f"{where}: {p.key} is not a number: give it as choices = [...], not a range")
            if not (_number(p.low) and _number(p.high)):
                raise ConfigError(f"{where}: {p.key}: low and high must both be numbers; got {p.low!r}, {p.high!r}")
            if p.low >= p.high:
                what = "empty" if p.low == p.high else "inverted"
                raise ConfigError(f"{where}: {p.key}: the range {p.low:g}..{p.high:g} is {what}; low must be below high")
            if kind is int and not (float(p.low).is_integer() and float(p.high).is_integer()):
                raise ConfigError(f"{where}: {p.key} takes integers; got {p.low:g}..{p.high:g}")
            if p.log and p.low <= 0:
                raise ConfigError(f"{where}: {p.key}: a log range needs low > 0; got {p.low:g}")
            if p.step is not None and (not _number(p.step) or p.step <= 0 or p.step > p.high - p.low or p.log):
                raise ConfigError(f"{where}: {p.key}: step must be > 0, at most high - low, and not with log; "
                                  f"got {p.step!r}")
            values = [p.low, p.high]
        for value in values:
            try:
                recipe.override({p.key: value})
            except ConfigError as e:
                raise ConfigError(f"{where}: {p.key} = {value!r}: {e}") from None


def load_space(path: str | Path, recipe: Recipe) -> tuple[Param, ...]:
    """A space from TOML (see the module docstring), checked against ``recipe``."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"search-space file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read search-space file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    space = []

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for name, value in table.items():
            key = f"{prefix}{name}"
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {key} = {value!r}: give each parameter a table, e.g. "
                                  f"[{key}] with low/high or choices")
            if value.keys() & SPEC_KEYS:
                unknown = sorted(set(value) - SPEC_KEYS)
                if unknown:
                    raise ConfigError(f"{path}: [{key}]: unknown field {unknown[0]!r}; use low, high, log, step "
                                      "or choices")
                choices = value.get("choices", ())
                if not isinstance(choices, list | tuple):
                    raise ConfigError(f"{path}: [{key}]: choices must be a list")
                space.append(Param(key, value.get("low"), value.get("high"), bool(value.get("log", False)),
                                   value.get("step"), tuple(_choice(c) for c in choices)))
            elif not value:
                raise ConfigError(f"{path}: [{key}] is empty: give low and high, or choices")
            else:
                walk(value, key + ".")

    walk(raw, "")
    space_t = tuple(space)
    check_space(recipe, space_t, where=str(path))
    return space_t


def _choice(value: Any) -> Any:
    """A TOML value as an Optuna categorical choice: lists (widths) become "16,32,64" strings."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def default_space(recipe: Recipe) -> tuple[Param, ...]:
    """The space searched when no file is given: around ``recipe``'s own values (module docstring)."""
    o, s, t, m, d = recipe.optim, recipe.schedule, recipe.train, recipe.model, recipe.data
    space = [Param("optim.lr", _sig(o.lr / 3), _sig(o.lr * 3), log=True)]
    if o.momentum > 0:
        space.append(Param("optim.momentum", min(0.8, o.momentum), max(0.95, o.momentum)))
    if o.weight_decay > 0:
        space.append(Param("optim.weight_decay", _sig(o.weight_decay / 4), _sig(o.weight_decay * 4), log=True))
    space.append(Param("train.label_smoothing", 0.0, max(0.2, t.label_smoothing)))
    if s.kind in ("one-cycle", "cosine"):
        space.append(Param("schedule.warmup_frac", min(0.05, s.warmup_frac), max(0.4, s.warmup_frac)))
    space.append(Param("train.epochs", _sig(t.epochs * 0.5), _sig(t.epochs * 1.25)))
    space.append(Param("train.batch_size", choices=tuple(sorted({max(1, t.batch_size // 2), t.batch_size,
                                                                  t.batch_size * 2}))))
    keep = 1 if m.stem == "whiten" else 0  # a whitening stem's width is set by the patch size
    widths = {",".join(str(w) if i < keep else str(max(1, round(w * f))) for i, w in enumerate(m.widths))
              for f in (0.75, 1.0, 1.25)}
    current = ",".join(map(str, m.widths))
    space.append(Param("model.widths", choices=(current, *sorted(widths - {current}))))
    if o.name == "muon":
        space.append(Param("optim.muon_lr", _sig(o.muon_lr / 3), _sig(o.muon_lr * 3), log=True))
        space.append(Param("optim.muon_momentum", min(0.7, o.muon_momentum), max(0.95, o.muon_momentum)))
    if d.resize_start_scale < 1:
        space.append(Param("data.resize_start_scale", 0.5, 1.0))
    return tuple(space)


def recipe_values(recipe: Recipe, space: Sequence[Param]) -> dict[str, Any]:
    """The recipe's own value of each searched key, as the space's distributions hold them (the first
    trial of a new study is the recipe itself, when every value lies in the space)."""
    values = {}
    for p in space:
        value = recipe.to_dict()
        for part in p.key.split("."):
            value = value[part]
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        values[p.key] = value
    return values


def in_space(values: Mapping[str, Any], recipe: Recipe, space: Sequence[Param]) -> bool:
    return all(p.distribution(recipe)._contains(p.distribution(recipe).to_internal_repr(values[p.key]))
               if not p.choices else values[p.key] in p.choices for p in space)


def space_to_dict(space: Sequence[Param]) -> dict[str, dict[str, Any]]:
    """JSON-able form, stored with the study (a study resumed with another space is refused)."""
    found = {}
    for p in space:
        if p.choices:
            found[p.key] = {"choices": list(p.choices)}
        else:
            found[p.key] = {"low": p.low, "high": p.high, **({"log": True} if p.log else {}),
                            **({"step": p.step} if p.step is not None else {})}
    return found


def _sig(x: float) -> float:
    """Four significant digits: ranges read as people would write them (0.2, not 0.19999999999999998)."""
    return float(f"{x:.4g}")
