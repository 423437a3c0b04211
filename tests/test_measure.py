import time

import pytest
import torch

from speedrun.measure.clock import Clock
from speedrun.measure.flops import forward_flops_per_image, matmul_peak, train_flops_per_image
from speedrun.measure.stats import mlperf_aggregate, seed_stats


def test_clock_tallies_evaluation_inside_the_total():
    clock = Clock().start()
    time.sleep(0.02)
    with clock.evaluating():
        time.sleep(0.03)
    total = clock.stop()
    assert clock.eval_s >= 0.03 and total >= clock.eval_s + 0.02
    assert clock.train_s == pytest.approx(total - clock.eval_s)
    time.sleep(0.01)
    assert clock.elapsed() == total  # stopped clocks stay stopped


def test_clock_calls_sync_before_reading():
    calls = []
    clock = Clock(sync=lambda: calls.append(1)).start()
    clock.elapsed()
    assert calls


def test_flops_of_a_linear_layer():
    model = torch.nn.Linear(30, 20, bias=False)
    x = torch.randn(4, 30)
    assert forward_flops_per_image(model, x) == 2 * 30 * 20
    # backward: weight gradient only (the input needs no gradient)
    assert train_flops_per_image(model, x) == 2 * (2 * 30 * 20)


def test_flops_of_a_conv_layer():
    model = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 10, 10)
    assert forward_flops_per_image(model, x) == 2 * 10 * 10 * 8 * 3 * 9


def test_matmul_peak_is_measured_once_and_cached(isolated_home):
    peak = matmul_peak(torch.device("cpu"), "test-cpu")
    assert peak > 1e8
    assert (isolated_home / "cache" / "peak_flops.json").is_file()
    assert matmul_peak(torch.device("cpu"), "test-cpu") == peak


def test_mlperf_aggregate_drops_fastest_and_slowest():
    assert mlperf_aggregate([5.0, 1.0, 3.0, 4.0, 100.0]) == pytest.approx(4.0)
    assert mlperf_aggregate([5.0, None, 3.0, 4.0, 1.0]) == pytest.approx(4.0)  # failure counts as slowest
    assert mlperf_aggregate([5.0, None, None, 4.0, 1.0]) is None  # two failures invalidate
    assert mlperf_aggregate([1.0, 2.0]) is None


def test_seed_stats():
    s = seed_stats([10.0, None, 14.0, 12.0])
    assert (s.runs, s.passed, s.median_s, s.min_s, s.max_s) == (4, 3, 12.0, 10.0, 14.0)
    assert s.pass_rate == 0.75 and s.cv == pytest.approx(2.0 / 12.0)
    assert seed_stats([None]).median_s is None and seed_stats([None]).pass_rate == 0.0
