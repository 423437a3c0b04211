"""What a run is assembled into: the trainer builds the model, loaders and optimizer, and the
enabled techniques change it stage by stage (``speedrun.techniques.registry.assemble``)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.config import Recipe


@dataclass
class Assembly:
    """A run being put together. The trainer fills the first fields; techniques read them and may
    replace ``model`` (before the optimizer exists), ``net``, ``loss_fn``, ``autocast`` and
    ``grad_scaler``, and add fit hooks as ``(order, hook)`` pairs."""

    recipe: Recipe
    device: torch.device
    precision: str  # resolved: fp32, bf16 or fp16
    seed: int
    num_classes: int
    image_size: tuple[int, int]
    train_loader: Any
    model: nn.Module
    init_images: int = 5000  # training images a data-dependent init sees (airbench whitens on 5,000)
    optimizer: torch.optim.Optimizer | None = None
    net: nn.Module | None = None  # what the loop calls: the model, or its torch.compile wrapper
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    grad_scaler: torch.amp.GradScaler | None = None
    hooks: list[tuple[int, object]] = field(default_factory=list)

    @property
    def native_size(self) -> int:
        """The side training images have when not resized (the smaller one of a non-square set)."""
        return min(self.image_size)
