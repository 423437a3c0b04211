"""Inference latency one image at a time (DAWNBench's inference metric), taken outside any run's clock."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor


@dataclass(frozen=True)
class LatencyStats:
    median_s: float
    p90_s: float
    samples: int


@torch.inference_mode()
def inference_latency(infer: Callable[[Tensor], Tensor], images: Iterable[Tensor], *, warmup: int = 3) -> LatencyStats:
    """Time ``infer`` (a model's forward, test-time views and all) on each image, a batch of one, as a
    deployed model would see them, through to its predicted class.

    The first ``warmup`` images are run untimed (allocator and kernel selection). On CUDA each timing
    ends with a sync.
    """
    batches = list(images)
    if not batches:
        raise ValueError("no images to time")
    device = batches[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for x in batches[:warmup]:
        infer(x)
    sync()
    times = []
    for x in batches:
        start = time.perf_counter()
        infer(x).argmax(1)
        sync()
        times.append(time.perf_counter() - start)
    ordered = sorted(times)
    return LatencyStats(statistics.median(times), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], len(times))
