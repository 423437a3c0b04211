"""FLOP counting (PyTorch's FlopCounterMode: matmuls and convolutions, 2 FLOPs per MAC) and MFU.

The peak is *measured*, not taken from a datasheet: the best of a few large fp32 (or bf16)
matmuls on this device, cached per device, dtype, thread count and torch version.
"""
from __future__ import annotations

import copy
import json
import time

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from speedrun import paths


def train_flops_per_image(model: nn.Module, example: Tensor, loss_fn=None) -> float:
    """FLOPs of one forward + backward pass per image, counted on a copy of ``model``."""
    model = copy.deepcopy(model).train()
    with FlopCounterMode(display=False) as counter:
        out = model(example)
        loss = loss_fn(out) if loss_fn else out.float().sum()
        loss.backward()
    return counter.get_total_flops() / len(example)


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


def matmul_peak(device: torch.device, device_name: str, dtype: torch.dtype = torch.float32) -> float:
    """The measured matmul peak for this device, measured once and cached in ``$SPEEDRUN_HOME``.

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
    if key not in cache:
        cache[key] = measure_matmul_peak(device, dtype, n=n)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    return cache[key]
