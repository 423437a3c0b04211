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
                        repeats: int = 5) -> float:
    """Best FLOP/s of ``repeats`` n x n matmuls (after a warm-up)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def matmul_peak(device: torch.device, device_name: str, dtype: torch.dtype = torch.float32) -> float:
    """The measured matmul peak for this device, measured once and cached in ``$SPEEDRUN_HOME``."""
    key = f"{device_name}|{dtype}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = paths.cache_dir() / "peak_flops.json"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = measure_matmul_peak(device, dtype)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache, indent=1))
        except OSError:
            pass  # an unwritable cache only costs a re-measurement next time
    return cache[key]
