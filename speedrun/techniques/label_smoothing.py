"""Label smoothing (Szegedy et al. 2016): train against (1 - s) one-hot + s uniform targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_labels(targets: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """Soft targets: ``1 - smoothing + smoothing / k`` on the true class, ``smoothing / k`` elsewhere."""
    soft = torch.full((len(targets), num_classes), smoothing / num_classes, device=targets.device)
    return soft.scatter_(1, targets[:, None], 1.0 - smoothing + smoothing / num_classes)


def smoothed_cross_entropy(logits: Tensor, targets: Tensor, smoothing: float) -> Tensor:
    """Cross-entropy against smoothed targets (PyTorch's fused ``label_smoothing``).

    ``targets`` are class indices (n,) or class probabilities (n, k), such as mixup or CutMix make;
    probabilities ``p`` are smoothed to ``(1 - smoothing) * p + smoothing / k``. Being linear in the
    target, this is the blend of the two images' smoothed losses, as timm computes it.
    """
    return F.cross_entropy(logits, targets, label_smoothing=smoothing)
