"""FLOP counting (PyTorch's FlopCounterMode: matmuls and convolutions, 2 FLOPs per MAC) and MFU.

Counted FLOPs include a convolution's multiplications by its zero padding, which a dense kernel does
but which do no useful work (~24% of the fashion-mnist recipe's conv FLOPs, ~40% in its 3x3 px
layers); *useful* FLOPs leave them out, counted exactly per conv from its geometry (``conv_taps``).
MFU is useful FLOP/s over a peak, taken two ways: the *measured* peak, the best of a few large
matmuls in the run's precision on this device (cached per device, dtype, thread count and torch
version), and the *theoretical* peak of the hardware (``speedrun.measure.peak``).
"""
from __future__ import annotations

import copy
import functools
import json
import math
import time

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from speedrun import paths


def conv_taps(size: int, kernel: int, *, stride: int = 1, dilation: int = 1, pad_before: int = 0,
              pad_after: int = 0) -> tuple[int, int]:
    """Along one dimension of a convolution: (kernel taps computed, taps that read the input rather
    than zero padding), summed over the output positions.

    >>> conv_taps(4, 3, pad_before=1, pad_after=1)  # outputs 0 and 3 each have one tap in the padding
    (12, 10)
    """
    out = (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1
    useful = sum(1 for o in range(out) for j in range(kernel) if 0 <= o * stride - pad_before + j * dilation < size)
    return out * kernel, useful


def _padding_waste(conv: nn.modules.conv._ConvNd, x: Tensor) -> float:
    """Forward FLOPs ``conv`` spends on zero padding for input ``x`` (0 for reflect/replicate/circular
    padding, whose padded values are real)."""
    if conv.padding_mode != "zeros":
        return 0.0
    pads = conv._reversed_padding_repeated_twice  # (last dim before, after, ..., first dim before, after)
    computed = useful = 1
    for d, size in enumerate(x.shape[2:]):
        before, after = pads[2 * (len(x.shape) - 3 - d)], pads[2 * (len(x.shape) - 3 - d) + 1]
        c, u = conv_taps(size, conv.kernel_size[d], stride=conv.stride[d], dilation=conv.dilation[d],
                         pad_before=before, pad_after=after)
        computed, useful = computed * c, useful * u
    return 2.0 * x.shape[0] * conv.out_channels * (conv.in_channels // conv.groups) * (computed - useful)


@functools.cache
def _grouped_weight_grad_overcount() -> bool:
    """Whether this torch's FlopCounterMode counts a grouped conv's weight gradient ``groups`` times over.

    Its formula treats the weight gradient as a conv over all ``in_channels`` where each group sees only
    ``in_channels / groups`` (torch 2.13 does): a depthwise conv's weight gradient is counted
    ``in_channels`` times too high. Probed on a 1x1 conv with two groups, whose weight gradient costs
    what its forward does, so that a torch that counts it right is left alone.
    """
    conv = nn.Conv2d(2, 2, 1, groups=2, bias=False)
    with FlopCounterMode(display=False) as counter:
        conv(torch.ones(1, 2, 1, 1)).sum().backward()
    return counter.get_total_flops() > 2 * 2 * 1 * 2  # forward 4 FLOPs + weight gradient 4


def _grouped_weight_grad_excess(conv: nn.modules.conv._ConvNd, x: Tensor, out: Tensor) -> float:
    """FLOPs the counter adds to ``conv``'s weight gradient beyond the real ones, for input ``x``, output ``out``."""
    if conv.groups == 1 or not conv.weight.requires_grad:
        return 0.0
    real = (2.0 * x.shape[0] * conv.out_channels * (conv.in_channels // conv.groups)
            * math.prod(conv.kernel_size) * math.prod(out.shape[2:]))
    return real * (conv.groups - 1)


def count_train_flops(model: nn.Module, example: Tensor, loss_fn=None) -> tuple[float, float]:
    """(counted, useful) FLOPs of one forward + backward pass per image, on a copy of ``model``.

    Useful FLOPs are the counted ones less every convolution's multiplications by zero padding, in
    each pass that runs: the forward, the input gradient (when the conv's input needs one) and the
    weight gradient (when its weight trains) touch the same input-position x tap pairs. Both leave out
    what PyTorch's counter over-counts in a grouped conv's weight gradient (``_grouped_weight_grad_overcount``).
    """
    model = copy.deepcopy(model).train()
    waste = excess = 0.0

    def note(conv, inputs, output) -> None:
        nonlocal waste, excess
        passes = 1 + inputs[0].requires_grad + conv.weight.requires_grad
        waste += passes * _padding_waste(conv, inputs[0])
        if overcount:
            excess += _grouped_weight_grad_excess(conv, inputs[0], output)

    overcount = _grouped_weight_grad_overcount()  # probed here: not inside the counter below
    handles = [m.register_forward_hook(note) for m in model.modules()
               if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed]
    try:
        with FlopCounterMode(display=False) as counter:
            out = model(example)
            loss = loss_fn(out) if loss_fn else out.float().sum()
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    total = counter.get_total_flops() - excess
    return total / len(example), (total - waste) / len(example)


def train_flops_per_image(model: nn.Module, example: Tensor, loss_fn=None) -> float:
    """FLOPs of one forward + backward pass per image as counted (padding included), on a copy of ``model``."""
    return count_train_flops(model, example, loss_fn)[0]


def forward_flops_per_image(model: nn.Module, example: Tensor) -> float:
    model = copy.deepcopy(model).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(example)
    return counter.get_total_flops() / len(example)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048,
                        repeats: int = 5, max_s: float = 1.0) -> float:
    """Best FLOP/s of ``repeats`` n x n matmuls (after a warm-up).

    Where one n x n matmul would take more than ``max_s``, a smaller power-of-two size is used,
    found by doubling from 256: bf16 on a CPU without native bf16 is emulated at ~1 GFLOP/s, so
    2048² would cost ~20 s a matmul (minutes in all), while 512² already shows the same rate.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(a: Tensor, b: Tensor) -> float:
        t0 = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - t0

    size = min(256, n)
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        timed(a, b)  # warm-up: library initialisation, allocator
        if size * 2 > n or timed(a, b) * 8 > max_s:  # the next size costs ~8x
            break
        size *= 2
    best = min(timed(a, b) for _ in range(repeats))
    return 2 * size**3 / best


def precision_dtype(precision: str) -> torch.dtype:
    """The dtype whose matmul peak bounds a run in ``precision`` (resolved: fp32, bf16 or fp16)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def matmul_peak(device: torch.device, device_name: str, dtype: torch.dtype = torch.float32, *,
                at_least: float = 0.0, remeasure: bool = False) -> float:
    """The measured matmul peak for this device, measured once and cached in ``$SPEEDRUN_HOME``.

    A measurement taken while other work shared the machine understates the peak for every run that
    reads it later. ``at_least`` (a rate the caller has just sustained, e.g. a run's useful FLOP/s) above
    the cached value proves it stale: the peak is measured again and the cache keeps the higher value.
    ``remeasure`` measures again regardless and keeps the higher value, so the cache holds the best rate
    the device has been seen to reach: one reading can be several times too low (a 2-core Xeon VM's bf16
    2048² matmul read 514-2,119 GFLOP/s within one hour, most likely neighbours sharing its cores' AMX
    units; BENCHMARKS.md "A third CPU kind"), which would inflate every MFU set against it.

    On a GPU the product is 8192²: at 2048² a data-centre GPU finishes in tens of microseconds and the
    launch, not the tensor cores, sets the rate.
    """
    n = 8192 if device.type == "cuda" else 2048
    key = f"{device_name}|{dtype}|n={n}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = paths.cache_dir() / "peak_flops.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache or cache[key] < at_least or remeasure:
        cache[key] = max(cache.get(key, 0.0), measure_matmul_peak(device, dtype, n=n))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    return cache[key]
