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


def test_a_cached_peak_below_a_sustained_rate_is_measured_again_and_the_higher_kept(isolated_home, monkeypatch):
    from speedrun.measure import flops

    measured = []
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: measured.append(1) or 50e9)
    assert flops.matmul_peak(torch.device("cpu"), "test-cpu") == 50e9  # first call: measured
    path = isolated_home / "cache" / "peak_flops.json"
    path.write_text(path.read_text().replace("50000000000.0", "16000000000.0"))  # measured on a busy machine
    assert flops.matmul_peak(torch.device("cpu"), "test-cpu", at_least=10e9) == 16e9  # plausible: kept
    assert flops.matmul_peak(torch.device("cpu"), "test-cpu", at_least=20e9) == 50e9  # a run beat it: stale
    assert flops.matmul_peak(torch.device("cpu"), "test-cpu") == 50e9 and len(measured) == 2  # cached again
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: 30e9)  # a busy re-measurement ...
    assert flops.matmul_peak(torch.device("cpu"), "test-cpu", at_least=60e9) == 50e9  # ... never lowers it



def test_remeasuring_keeps_the_best_peak_seen(isolated_home, monkeypatch):
    """A long run measures again: a higher reading replaces the cache (its first reading was a slow
    moment), a lower one leaves it (this moment is the slow one)."""
    from speedrun.measure import flops

    readings = iter([600e9, 2100e9, 700e9])
    monkeypatch.setattr(flops, "measure_matmul_peak", lambda *a, **k: next(readings))
    assert flops.matmul_peak(torch.device("cpu"), "test-cpu") == 600e9
    assert flops.matmul_peak(torch.device("cpu"), "test-cpu") == 600e9  # cached: not measured
    assert flops.matmul_peak(torch.device("cpu"), "test-cpu", remeasure=True) == 2100e9
    assert flops.matmul_peak(torch.device("cpu"), "test-cpu", remeasure=True) == 2100e9
    assert next(readings, None) is None  # three readings taken, no more

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


def test_padding_taps_of_a_tiny_conv_against_a_hand_count():
    from speedrun.measure.flops import conv_taps, count_train_flops

    # 3x3, padding 1 on a 4x4 image, per dimension: outputs 0 and 3 see 2 real pixels of their 3 taps,
    # outputs 1 and 2 see 3: 10 useful taps of 12; in 2-D 100 of the 144 (output pixel, tap) pairs.
    assert conv_taps(4, 3, pad_before=1, pad_after=1) == (12, 10)
    assert conv_taps(5, 3, stride=2, pad_before=1, pad_after=1) == (9, 7)  # outputs at -1..1, 1..3, 3..5
    assert conv_taps(6, 3, dilation=2, pad_before=2, pad_after=2) == (18, 14)  # 2+2+3+3+2+2
    conv = torch.nn.Conv2d(2, 5, 3, padding=1, bias=False)
    x = torch.randn(3, 2, 4, 4)  # the input needs no gradient: forward and weight gradient only
    counted, useful = count_train_flops(conv, x)
    assert counted == 2 * (2 * 5 * 2 * 144)  # forward + weight gradient, 2 FLOPs per MAC, per image
    assert useful == 2 * (2 * 5 * 2 * 100)
    x.requires_grad_(True)  # now the input gradient runs too, over the same pairs
    assert count_train_flops(conv, x) == (3 * 2 * 5 * 2 * 144, 3 * 2 * 5 * 2 * 100)
    reflect = torch.nn.Conv2d(2, 5, 3, padding=1, padding_mode="reflect", bias=False)
    counted, useful = count_train_flops(reflect, x)
    assert useful == counted  # reflected pixels are real data


def test_padding_taps_of_a_non_square_strided_conv_against_a_hand_count():
    from speedrun.measure.flops import count_train_flops

    # A 3x1 kernel, stride (2, 1), padding (1, 0) on a 5x4 image. Height: outputs at rows -1..1, 1..3, 3..5,
    # 7 of their 9 taps on real rows; width: 4 outputs of one tap, none in padding. 36 (pixel, tap) pairs, 28 real.
    conv = torch.nn.Conv2d(2, 3, (3, 1), stride=(2, 1), padding=(1, 0), bias=False)
    counted, useful = count_train_flops(conv, torch.randn(2, 2, 5, 4))
    assert counted == 2 * (2 * 3 * 2 * 36)  # forward + weight gradient
    assert useful == 2 * (2 * 3 * 2 * 28)  # heights and widths swapped would count other taps


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_a_grouped_conv_counts_each_group_over_its_own_channels(groups):
    from speedrun.measure.flops import count_train_flops

    # Each output channel reads in_channels / groups inputs, in the forward and in the weight gradient
    # alike (PyTorch's own counter bills the weight gradient over all of them: groups times too many).
    conv = torch.nn.Conv2d(4, 4, 3, padding=1, groups=groups, bias=False)
    counted, useful = count_train_flops(conv, torch.randn(3, 4, 5, 5))
    per_pass = 2 * 4 * (4 // groups)  # FLOPs per (output pixel, tap) pair
    assert counted == 2 * per_pass * 225  # 5x5 outputs x 9 taps
    assert useful == 2 * per_pass * 169  # 13 x 13: conv_taps(5, 3, pad 1) = (15, 13)


def test_gpu_datasheet_names_match_whole_words():
    from speedrun.measure.peak import gpu_peak

    assert gpu_peak("NVIDIA A100-SXM4-80GB", "bf16").flops == 312e12
    assert gpu_peak("NVIDIA L40S", "bf16").flops == 362.1e12  # not the L4's 121
    assert gpu_peak("NVIDIA L4", "bf16").flops == 121e12
    assert gpu_peak("NVIDIA H100 NVL", "bf16").flops == 835.5e12  # not the SXM part's
    assert gpu_peak("NVIDIA RTX A1000", "bf16") is None  # not an A100
    assert gpu_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 there: no figure rather than another GPU's


def test_theoretical_cpu_peak_from_flags():
    from speedrun.measure.peak import cpu_peak, fp32_flop_per_cycle, gpu_peak

    zen3 = frozenset({"sse2", "avx", "avx2", "fma"})
    zen5 = zen3 | {"avx512f", "avx512_bf16"}
    assert fp32_flop_per_cycle(zen3, vendor="AuthenticAMD", family=25) == 32
    assert fp32_flop_per_cycle(zen5, vendor="AuthenticAMD", family=25) == 32  # Zen 4: 512-bit on 256-bit pipes
    assert fp32_flop_per_cycle(zen5, vendor="AuthenticAMD", family=26) == 64
    peak = cpu_peak("fp32", threads=2, flags=zen3, vendor="AuthenticAMD", family=25, clock_ghz=2.5)
    assert peak.flops == 2 * 2.5e9 * 32 and "2 cores x 2.50 GHz x 32 FLOP/cycle" in peak.how
    assert cpu_peak("bf16", threads=2, flags=zen3, vendor="AuthenticAMD", family=25, clock_ghz=2.5) is None
    assert cpu_peak("bf16", threads=2, flags=zen5, vendor="AuthenticAMD", family=26, clock_ghz=2.5).flops == 640e9
    assert gpu_peak("NVIDIA H100 PCIe", "bf16").flops == 756e12 and gpu_peak("NVIDIA H200", "bf16").flops == 989.4e12
    assert gpu_peak("Some Future GPU", "bf16") is None
    assert cpu_peak("fp32", threads=2, flags=zen3, vendor="AuthenticAMD", family=25, clock_ghz=0.0) is None  # a VM's "0 MHz"
