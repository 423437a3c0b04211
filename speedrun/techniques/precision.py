"""Mixed precision: run convolutions and matmuls in bf16 (or fp16 on CUDA) under autocast.

bf16 keeps fp32's exponent range, so it needs no loss scaling; fp16 (CUDA only) does, and the
trainer then steps through a ``GradScaler``. On a CPU, bf16 pays only where the cores have native
bf16 dot products (AVX-512 BF16, AMX): elsewhere oneDNN emulates it and it is slower than fp32.
``train.precision=auto`` is resolved per device by ``speedrun.env.resolve_precision``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, ContextManager

import torch



def autocast_for(precision: str, dev: torch.device) -> Callable[[], ContextManager]:
    """A factory of the forward pass's autocast context: none for fp32.

    Under CPU autocast, convs and linears run in bf16; batch norm is not on autocast's lists, so it
    takes the conv's bf16 output, normalises it with fp32 statistics and fp32 affine parameters,
    updates fp32 running stats and returns bf16 (tests/test_precision.py checks this).
    """
    if precision not in ("bf16", "fp16"):
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, dev.type, dtype=dtype)
