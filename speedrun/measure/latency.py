"""Inference latency one image at a time (DAWNBench's inference metric), taken outside any run's clock."""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from speedrun.techniques.tta import tta_logits


@dataclass(frozen=True)
class LatencyStats:
    median_s: float
    p90_s: float
    samples: int


@torch.inference_mode()
def inference_latency(model: nn.Module, images: Iterable[Tensor], *, tta_flip: bool = False,
                      tta_translate_px: int = 0, precision: str = "fp32", warmup: int = 3) -> LatencyStats:
    """Time ``model`` on each image (a batch of one, already normalized), as a deployed model would see them.

    The first ``warmup`` images are run untimed (allocator and kernel selection); with test-time
    augmentation each image costs a forward pass per view, as in the evaluation. On CUDA each timing
    ends with a sync.
    """
    was_training = model.training
    model.eval()
    batches = list(images)
    if not batches:
        raise ValueError("no images to time")
    device = batches[0].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = contextlib.nullcontext
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        autocast = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731

    def infer(x: Tensor) -> Tensor:
        with autocast():
            return tta_logits(model, x, flip=tta_flip, translate_px=tta_translate_px)

    for x in batches[:warmup]:
        infer(x)
    sync()
    times = []
    for x in batches:
        start = time.perf_counter()
        infer(x).argmax(1)
        sync()
        times.append(time.perf_counter() - start)
    model.train(was_training)
    ordered = sorted(times)
    return LatencyStats(statistics.median(times), ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], len(times))
