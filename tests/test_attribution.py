"""The attribution math on synthetic runs with known effects."""
from __future__ import annotations

import math

import numpy as np
import pytest

from speedrun.attribution import (Ratio, Sample, accuracy_effect, attribute, median_time, ratio_of_products,
                                  speedup)


def lognormal_runs(rng: np.random.Generator, median_s: float, n: int, sigma: float = 0.1) -> Sample:
    """``n`` run times whose true median is ``median_s``."""
    return Sample.of(list(median_s * np.exp(rng.normal(0.0, sigma, n))))


def test_speedup_recovers_a_known_factor():
    rng = np.random.default_rng(0)
    r = speedup(lognormal_runs(rng, 30.0, 15), lognormal_runs(rng, 10.0, 15))
    assert r.kind == "estimate" and r.low < 3.0 < r.high and abs(r.value - 3.0) < 0.3
    assert r.excludes_one and str(r).startswith(f"{r.value:.2f}x [")


def test_the_interval_is_deterministic_for_a_seed_and_narrows_with_more_runs():
    rng = np.random.default_rng(1)
    a, b = lognormal_runs(rng, 20.0, 5), lognormal_runs(rng, 10.0, 5)
    assert speedup(a, b, seed=3) == speedup(a, b, seed=3)
    wide = speedup(a, b)
    narrow = speedup(lognormal_runs(rng, 20.0, 40), lognormal_runs(rng, 10.0, 40))
    assert narrow.high - narrow.low < wide.high - wide.low


def test_no_effect_gives_an_interval_around_one():
    rng = np.random.default_rng(2)
    r = speedup(lognormal_runs(rng, 10.0, 10), lognormal_runs(rng, 10.0, 10))
    assert r.low < 1.0 < r.high and not r.excludes_one


def test_coverage_of_the_95_percent_interval():
    """Over many simulated experiments the interval covers the true ratio about 95% of the time."""
    rng = np.random.default_rng(12345)
    true_ratio, experiments, covered = 1.7, 300, 0
    for i in range(experiments):
        without, with_ = lognormal_runs(rng, 17.0, 7, 0.15), lognormal_runs(rng, 10.0, 7, 0.15)
        r = speedup(without, with_, resamples=2000, seed=i)
        covered += r.low <= true_ratio <= r.high
    assert 0.85 <= covered / experiments <= 0.99, covered / experiments


def test_median_counts_unreached_runs_as_slowest():
    assert median_time([1.0, 2.0, None]) == 2.0
    assert math.isinf(median_time([1.0, None, None])) and math.isinf(median_time([]))
    s = Sample.of([4.0, None, 5.0], ran_s=[4.0, 9.0, 5.0], best_accuracy=[0.93, 0.80, 0.92])
    assert s.pass_rate == pytest.approx(2 / 3) and s.median_s == 5.0 and s.median_best_accuracy == 0.92
    assert list(s.values()) == [4.0, math.inf, 5.0] and list(s.values(censored=True)) == [4.0, 9.0, 5.0]


def test_a_variant_that_never_reaches_gives_a_lower_bound_not_a_drop():
    full = Sample.of([10.0, 11.0, 12.0])
    never = Sample.of([None, None, None], ran_s=[40.0, 42.0, 41.0], best_accuracy=[0.7, 0.72, 0.71])
    r = speedup(never, full)
    assert r.kind == "lower_bound" and r.value == pytest.approx(41.0 / 11.0) and r.low is None
    assert str(r) == f">= {41 / 11:.2f}x"
    assert speedup(full, never).kind == "upper_bound"
    assert speedup(never, never).kind == "unknown" and speedup(never, never).value is None
    assert accuracy_effect(full, never) is None  # no accuracies given for full
    with_acc = Sample.of([10.0], best_accuracy=[0.92])
    assert accuracy_effect(with_acc, never) == pytest.approx(0.92 - 0.71)


def test_partly_failing_variant_keeps_an_estimate_with_an_open_interval():
    rng = np.random.default_rng(4)
    flaky = Sample.of([20.0, None, 21.0, 19.5, 22.0], ran_s=[20, 30, 21, 19.5, 22])
    r = speedup(flaky, lognormal_runs(rng, 10.0, 5))
    assert r.kind == "estimate" and r.value == pytest.approx(21.0 / 10.0, rel=0.15)
    assert math.isinf(r.high)  # some resamples draw mostly failed runs: the upper end is open


def test_names_on_both_sides_cancel_and_shared_variants_resample_together():
    rng = np.random.default_rng(5)
    samples = {"a": lognormal_runs(rng, 20.0, 6), "b": lognormal_runs(rng, 10.0, 6)}
    r = ratio_of_products(samples, ["a", "b"], ["b", "b"])
    assert r.value == pytest.approx(ratio_of_products(samples, ["a"], ["b"]).value)
    assert ratio_of_products(samples, ["a"], ["a"]) == Ratio(1.0, 1.0, 1.0)


def _ablation(rng, effects: dict[str, float], n: int = 8, extra: dict | None = None) -> dict[str, Sample]:
    """Variants of a multiplicative model: removing technique t multiplies the full time by effects[t]."""
    full = 10.0
    samples = {"full": lognormal_runs(rng, full, n), "baseline": lognormal_runs(rng, full * math.prod(effects.values()), n)}
    for t, f in effects.items():
        samples[f"-{t}"] = lognormal_runs(rng, full * f, n)
        samples[f"+{t}"] = lognormal_runs(rng, full * math.prod(effects.values()) / f, n)
    for name, median in (extra or {}).items():
        samples[name] = lognormal_runs(rng, median, n)
    return samples


def test_attribute_multiplicative_effects_multiply_up_to_the_total():
    rng = np.random.default_rng(6)
    effects = {"a": 2.0, "b": 1.5, "c": 1.0}
    samples = _ablation(rng, effects, extra={"-a-b": 10.0 * 3.0})
    result = attribute(samples, full="full", baseline="baseline", leave_one_out={t: f"-{t}" for t in effects},
                       add_one_in={t: f"+{t}" for t in effects}, pairs={("a", "b"): ("-a", "-b", "-a-b")}, resamples=2000)
    by = {(e.technique, e.mode): e for e in result.effects}
    for t, f in effects.items():
        for mode in ("leave-one-out", "add-one-in"):
            r = by[t, mode].speedup
            assert r.low <= f * 1.02 and r.high >= f / 1.02, (t, mode, r)
    assert by["a", "leave-one-out"].with_variant == "full" and by["a", "add-one-in"].without_variant == "baseline"
    assert result.total.low < 3.0 < result.total.high
    for check in result.products:
        assert check.product_over_total.low < 1.0 < check.product_over_total.high and not check.flagged
    (pair,) = result.interactions
    assert pair.ratio.low < 1.0 < pair.ratio.high and not pair.flagged


def test_attribute_flags_a_pair_that_only_helps_together():
    # airbench-style: a and b each give nothing alone, 2x together (the lookahead + BN momentum story)
    rng = np.random.default_rng(7)
    samples = {"full": lognormal_runs(rng, 10.0, 8), "-a": lognormal_runs(rng, 20.0, 8),
               "-b": lognormal_runs(rng, 20.0, 8), "-a-b": lognormal_runs(rng, 20.0, 8),
               "baseline": lognormal_runs(rng, 20.0, 8)}
    result = attribute(samples, full="full", baseline="baseline", leave_one_out={"a": "-a", "b": "-b"},
                       pairs={("a", "b"): ("-a", "-b", "-a-b")}, resamples=2000)
    (pair,) = result.interactions
    assert pair.flagged and pair.ratio.high < 1.0
    (check,) = result.products
    assert check.flagged and check.product.value == pytest.approx(4.0, rel=0.2)
    assert check.total.value == pytest.approx(2.0, rel=0.2)


def test_ratio_serialises_and_prints():
    r = Ratio(2.0, 1.5, math.inf)
    assert str(r) == "2.00x [1.50, inf]" and Ratio.from_dict(r.to_dict()) == r and r.to_dict()["high"] == "inf"
    assert str(Ratio(None, kind="unknown")) == "unknown"
    assert Ratio(4.0, 1.0, 16.0).sqrt() == Ratio(2.0, 1.0, 4.0)
