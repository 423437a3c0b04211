"""What bought the speed: speedup factors with bootstrap confidence intervals, pure math on run times.

A *speedup* is a ratio of median times-to-accuracy, ``median(without) / median(with)``, so 2.0 means
the technique halves the time. Medians, not means: one slow seed (a page-cache miss, a noisy
neighbour) should not move the factor.

**Runs that never reached the target.** Their time-to-accuracy within the budget is unknown and
counts as +infinity (slower than any run that got there). A variant's median is then finite only
when more than half its runs reached the target; its pass-rate and best accuracy are always
reported. When a median is infinite the ratio is not dropped but turned into a *bound*: every
unreached run lasted ``ran_s`` seconds without getting there, so its true time is at least that, and
the median is monotone in each run, so replacing the unknown times by ``ran_s`` gives a lower bound
of the median. An infinite median in the numerator (the variant without the technique mostly
failed) yields ``kind="lower_bound"`` ("at least 3.1x"); one in the denominator yields
``kind="upper_bound"``; both yield ``kind="unknown"`` with no value. Bounds carry no interval.
A technique without which the target is missed is *needed* (:attr:`Effect.needed`): it is reported
as such, with the best accuracy reached without it, and its bound only where that says more than
"faster" (above 1): unreached runs that stopped before the full recipe's time give bounds below 1
("at least 0.97x"), true but read as a slowdown.

**Intervals.** Percentile bootstrap, :data:`RESAMPLES` resamples with a seeded ``numpy`` Generator
(deterministic for a given ``seed``). Each variant's runs are resampled independently of the
others': seeds are interleaved in time (see ``speedrun.ablate``), so machine drift is spread over
all variants rather than modelled. The intervals are checked in ``tests/test_attribution.py``:
on lognormal run times the 95% interval covers the true ratio in about 96% of simulated
experiments with 5 to 10 runs per variant (about 90% with only 3: use at least 5 seeds).

>>> full, without = Sample.of([10.0, 11.0, 9.5, 10.4, 10.2]), Sample.of([20.0, 22.5, 19.0, 21.0, 20.4])
>>> r = speedup(without, full)
>>> round(r.value, 2), r.kind, r.low < r.value < r.high
(2.0, 'estimate', True)
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Literal, Mapping, Sequence

import numpy as np

RESAMPLES = 10_000  # bootstrap resamples; at this count the interval ends move by < 1% between generator seeds
LEVEL = 0.95

Kind = Literal["estimate", "lower_bound", "upper_bound", "unknown"]


@dataclass(frozen=True)
class Sample:
    """One variant's runs: time-to-accuracy (None: never reached), how long each ran, best accuracy.

    ``ran_s[i]`` is how long run i lasted; for an unreached run it is a lower bound of its unknown
    time-to-accuracy (0 when not known).
    """

    times: tuple[float | None, ...]
    ran_s: tuple[float, ...]
    best_accuracy: tuple[float, ...] = ()

    @classmethod
    def of(cls, times: Sequence[float | None], *, ran_s: Sequence[float | None] | None = None,
           best_accuracy: Sequence[float] = ()) -> Sample:
        ran = ran_s if ran_s is not None else [t or 0.0 for t in times]
        if len(ran) != len(times):
            raise ValueError("times and ran_s must have one entry per run")
        return cls(tuple(None if t is None else float(t) for t in times),
                   tuple(float(r or 0.0) for r in ran), tuple(float(a) for a in best_accuracy))

    @property
    def runs(self) -> int:
        return len(self.times)

    @property
    def passed(self) -> int:
        return sum(t is not None for t in self.times)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.runs if self.runs else 0.0

    @property
    def median_s(self) -> float | None:
        """Median time-to-accuracy; None unless more than half the runs reached the target."""
        m = median_time(self.times)
        return m if math.isfinite(m) else None

    @property
    def median_best_accuracy(self) -> float | None:
        return float(np.median(self.best_accuracy)) if self.best_accuracy else None

    def values(self, *, censored: bool = False) -> np.ndarray:
        """Times as an array: unreached runs are +inf, or their ``ran_s`` when ``censored``."""
        return np.array([t if t is not None else (r if censored else math.inf)
                         for t, r in zip(self.times, self.ran_s)], dtype=float)


@dataclass(frozen=True)
class Ratio:
    """A factor with its interval; see the module docstring for ``kind``."""

    value: float | None
    low: float | None = None
    high: float | None = None
    kind: Kind = "estimate"
    level: float = LEVEL

    @property
    def excludes_one(self) -> bool:
        """True when the interval lies wholly above or below 1 (an estimate only)."""
        return (self.kind == "estimate" and self.low is not None and self.high is not None
                and (self.low > 1 or self.high < 1))

    def sqrt(self) -> Ratio:
        """The square root, end by end (for geometric means of two paths)."""
        root = lambda v: None if v is None else math.sqrt(v)
        return Ratio(root(self.value), root(self.low), root(self.high), self.kind, self.level)

    def __str__(self) -> str:
        if self.value is None:
            return "unknown"
        if self.kind == "lower_bound":
            return f">= {self.value:.2f}x"
        if self.kind == "upper_bound":
            return f"<= {self.value:.2f}x"
        if self.low is None or self.high is None:
            return f"{self.value:.2f}x"
        return f"{self.value:.2f}x [{_fmt(self.low)}, {_fmt(self.high)}]"

    def to_dict(self) -> dict:
        """Plain JSON: an infinite end (a resample where most runs failed) is the string "inf"."""
        return {**{k: "inf" if isinstance(v, float) and math.isinf(v) else v for k, v in asdict(self).items()},
                "text": str(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Ratio:
        num = lambda v: math.inf if v == "inf" else v
        return cls(num(d["value"]), num(d.get("low")), num(d.get("high")), d.get("kind", "estimate"),
                   d.get("level", LEVEL))


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def median_time(times: Sequence[float | None]) -> float:
    """Median with unreached runs (None) as +inf: finite only when more than half reached.

    >>> median_time([3.0, None, 1.0]), median_time([3.0, None]), median_time([None, None, 1.0])
    (3.0, inf, inf)
    """
    if not times:
        return math.inf
    return float(np.median([math.inf if t is None else t for t in times]))


def bootstrap_medians(values: np.ndarray, *, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Medians of ``resamples`` resamples (with replacement, same size) of ``values``."""
    n = len(values)
    return np.median(values[rng.integers(0, n, (resamples, n))], axis=1)


def ratio_of_products(samples: Mapping[str, Sample], numerator: Sequence[str], denominator: Sequence[str], *,
                      resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Ratio:
    """``prod(median(numerator)) / prod(median(denominator))`` with a percentile bootstrap interval.

    Names may repeat (a product of factors sharing a denominator); a name on both sides cancels.
    Each distinct variant is resampled once per bootstrap draw, so shared variants stay consistent.
    """
    num, den = Counter(numerator), Counter(denominator)
    num, den = num - den, den - num  # cancel names on both sides
    names = sorted(set(num) | set(den))
    for name in names:
        if not samples[name].runs:
            return Ratio(None, kind="unknown", level=level)
    medians = {name: median_time(samples[name].times) for name in names}
    inf_num = any(math.isinf(medians[n]) for n in num)
    inf_den = any(math.isinf(medians[n]) for n in den)

    def product(side: Counter, meds: Mapping[str, float]) -> float:
        return math.prod(meds[n] ** k for n, k in side.items())

    if inf_num and inf_den:
        return Ratio(None, kind="unknown", level=level)
    if inf_num or inf_den:  # a bound: unknown times replaced by how long those runs lasted
        bounded = {n: m if math.isfinite(m) else median_time(list(samples[n].values(censored=True)))
                   for n, m in medians.items()}
        top, bottom = product(num, bounded), product(den, bounded)
        value = top / bottom if bottom > 0 else math.inf
        if not math.isfinite(value):
            return Ratio(None, kind="unknown", level=level)
        return Ratio(value, kind="lower_bound" if inf_num else "upper_bound", level=level)

    value = product(num, medians) / product(den, medians)
    rng = np.random.default_rng(seed)
    draws = {n: bootstrap_medians(samples[n].values(), resamples=resamples, rng=rng) for n in names}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        top = np.prod([draws[n] ** k for n, k in num.items()], axis=0) if num else np.ones(resamples)
        bottom = np.prod([draws[n] ** k for n, k in den.items()], axis=0) if den else np.ones(resamples)
        ratios = top / bottom
    # A resample where both sides are infinite (most of both variants' drawn runs failed) has no
    # ratio; it is left out. Order statistics (inverted_cdf) keep infinite ends exact.
    ratios = ratios[~np.isnan(ratios)]
    if len(ratios) == 0:
        return Ratio(value, kind="estimate", level=level)
    alpha = (1 - level) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha], method="inverted_cdf")
    return Ratio(value, float(low), float(high), "estimate", level)


def speedup(without: Sample, with_: Sample, *, resamples: int = RESAMPLES, level: float = LEVEL,
            seed: int = 0) -> Ratio:
    """``median(without) / median(with_)``: how many times faster the variant with the technique is."""
    return ratio_of_products({"without": without, "with": with_}, ["without"], ["with"], resamples=resamples,
                             level=level, seed=seed)


def accuracy_effect(with_: Sample, without: Sample) -> float | None:
    """Median best accuracy with minus without (a fraction; x100 for percentage points).

    Runs stop at the target, so between two variants that both reach it this is near 0; it shows
    the effect when one of them falls short.
    """
    a, b = with_.median_best_accuracy, without.median_best_accuracy
    return None if a is None or b is None else a - b


@dataclass(frozen=True)
class Effect:
    """One technique's effect, measured one way (``leave-one-out``: the full recipe with and without
    it; ``add-one-in``: the all-off baseline with and without it)."""

    technique: str
    mode: str
    with_variant: str
    without_variant: str
    median_with_s: float | None
    median_without_s: float | None
    speedup: Ratio
    accuracy_effect: float | None
    pass_rate_with: float
    pass_rate_without: float
    best_accuracy_with: float | None
    best_accuracy_without: float | None

    @property
    def needed(self) -> bool:
        """Most runs without the technique missed the target, most runs with it reached it."""
        return self.median_without_s is None and self.median_with_s is not None

    @property
    def harmful(self) -> bool:
        """The other way round: with the technique the target is missed, without it reached."""
        return self.median_with_s is None and self.median_without_s is not None

    @property
    def text(self) -> str:
        """The speedup as the tables print it: a factor, or what is known when a side missed the target."""
        r = self.speedup
        if self.needed or self.harmful:
            side, rate = ("without", self.pass_rate_without) if self.needed else ("with", self.pass_rate_with)
            best = self.best_accuracy_without if self.needed else self.best_accuracy_with
            reached = "" if rate == 0 else f", {rate:.0%} of runs reached it"
            text = (f"{'needed to reach' if self.needed else 'misses'} the target ({side} it: best "
                    f"{'-' if best is None else f'{best:.1%}'}{reached})")
            informative = r.value is not None and (r.value > 1 if self.needed else r.value < 1)
            return text + (f"; {r}" if informative else "")
        return str(r)

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": {**self.speedup.to_dict(), "text": self.text}, "needed": self.needed}


@dataclass(frozen=True)
class ProductCheck:
    """Do the single-technique factors multiply up to the measured total (baseline time / full time)?

    ``product_over_total`` is 1 when they do; above 1 the techniques overlap (each one's factor,
    measured alone, claims part of the same saving), below 1 they reinforce each other.
    """

    mode: str
    product: Ratio
    total: Ratio
    product_over_total: Ratio
    flagged: bool

    def to_dict(self) -> dict:
        return {"mode": self.mode, "product": self.product.to_dict(), "total": self.total.to_dict(),
                "product_over_total": self.product_over_total.to_dict(), "flagged": self.flagged}


@dataclass(frozen=True)
class Interaction:
    """``t(-a-b) t(full) / (t(-a) t(-b))``: 1 when removing both costs the product of removing each."""

    a: str
    b: str
    ratio: Ratio
    flagged: bool  # the interval excludes 1: the two effects are not multiplicative

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "ratio": self.ratio.to_dict(), "flagged": self.flagged}


@dataclass(frozen=True)
class Attribution:
    effects: tuple[Effect, ...]
    total: Ratio | None  # median(baseline) / median(full)
    products: tuple[ProductCheck, ...]
    interactions: tuple[Interaction, ...]

    def to_dict(self) -> dict:
        return {"effects": [e.to_dict() for e in self.effects],
                "total": self.total.to_dict() if self.total else None,
                "products": [p.to_dict() for p in self.products],
                "interactions": [i.to_dict() for i in self.interactions]}


def interaction(samples: Mapping[str, Sample], *, full: str, without_a: str, without_b: str, without_ab: str,
                resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Ratio:
    """Pairwise non-multiplicativity: ``t(-a-b) t(full) / (t(-a) t(-b))``; see :class:`Interaction`."""
    return ratio_of_products(samples, [without_ab, full], [without_a, without_b], resamples=resamples,
                             level=level, seed=seed)


def attribute(samples: Mapping[str, Sample], *, full: str, baseline: str,
              leave_one_out: Mapping[str, str] | None = None, add_one_in: Mapping[str, str] | None = None,
              pairs: Mapping[tuple[str, str], tuple[str, str, str]] | None = None, resamples: int = RESAMPLES,
              level: float = LEVEL, seed: int = 0) -> Attribution:
    """Every factor of an ablation from its variants' samples.

    ``leave_one_out`` maps a technique to the variant without it (the full recipe less it);
    ``add_one_in`` maps it to the variant with only it (the baseline plus it); ``pairs`` maps
    ``(a, b)`` to the variants (full less a, full less b, full less both).
    """
    kw = dict(resamples=resamples, level=level, seed=seed)
    effects, products = [], []
    total = ratio_of_products(samples, [baseline], [full], **kw) if baseline != full else None
    for mode, variants in (("leave-one-out", leave_one_out or {}), ("add-one-in", add_one_in or {})):
        factors = []
        for technique, variant in variants.items():
            with_, without = (full, variant) if mode == "leave-one-out" else (variant, baseline)
            a, b = samples[with_], samples[without]
            effects.append(Effect(
                technique, mode, with_, without, a.median_s, b.median_s,
                ratio_of_products(samples, [without], [with_], **kw), accuracy_effect(a, b),
                a.pass_rate, b.pass_rate, a.median_best_accuracy, b.median_best_accuracy))
            factors.append((without, with_))
        if factors and total is not None:
            num, den = [w for w, _ in factors], [h for _, h in factors]
            product = ratio_of_products(samples, num, den, **kw)
            over = ratio_of_products(samples, num + [full], den + [baseline], **kw)
            products.append(ProductCheck(mode, product, total, over, over.excludes_one))
    interactions = []
    for (a, b), (without_a, without_b, without_ab) in (pairs or {}).items():
        ratio = interaction(samples, full=full, without_a=without_a, without_b=without_b, without_ab=without_ab,
                            **kw)
        interactions.append(Interaction(a, b, ratio, ratio.excludes_one))
    return Attribution(tuple(effects), total, tuple(products), tuple(interactions))
