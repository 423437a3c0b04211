"""Test-time augmentation: average the logits over mirrored and shifted copies of each image
(Myrtle.ai's 26 s CIFAR-10 run, airbench). It costs one forward pass per view at every evaluation and
buys accuracy that would otherwise take more training."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def shift_batch(images: Tensor, dy: int, dx: int) -> Tensor:
    """Move every image ``dy`` pixels down and ``dx`` right (negative: up, left), filling by reflection
    as the training-time ``translate_batch`` does."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return images
    h, w = images.shape[-2:]
    padded = F.pad(images, (pad,) * 4, mode="reflect")
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def tta_views(images: Tensor, *, flip: bool = False, translate_px: int = 0) -> list[Tensor]:
    """The image, shifted by +(p, p) and -(p, p) when ``translate_px`` = p > 0 (airbench's two diagonal
    shifts), and the mirror of each when ``flip``: up to six views."""
    p = translate_px
    views = [images] + ([shift_batch(images, p, p), shift_batch(images, -p, -p)] if p else [])
    return views + [v.flip(3) for v in views] if flip else views


def tta_logits(model: nn.Module, images: Tensor, *, flip: bool = False, translate_px: int = 0) -> Tensor:
    """Mean of the model's logits over ``tta_views`` (just ``model(images)`` with neither option).

    >>> import torch
    >>> tta_logits(nn.Flatten(), torch.arange(4.0).view(1, 1, 1, 4), flip=True)
    tensor([[1.5000, 1.5000, 1.5000, 1.5000]])
    """
    views = tta_views(images, flip=flip, translate_px=translate_px)
    logits = model(views[0])
    for view in views[1:]:
        logits = logits + model(view)
    return logits / len(views) if len(views) > 1 else logits
