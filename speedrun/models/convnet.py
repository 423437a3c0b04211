"""Small convolutional networks for 28-32 px images."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.config import ConfigError, ModelConfig
from speedrun.techniques.conv_init import init_whitening_

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "celu": nn.CELU, "silu": nn.SiLU, "hardswish": nn.Hardswish}


def global_max(x: Tensor) -> Tensor:
    """The maximum over space of each channel: (N, C, H, W) -> (N, C).

    ``max`` with indices, not ``amax``: ``amax``'s backward spreads the gradient over the elements
    equal to the maximum, and under torch.compile with bf16/fp16 autocast TorchInductor compares a
    recomputed higher-precision activation with the rounded maximum, finds no element equal, and divides
    by zero -- NaN gradients from the first step (seen with torch 2.11 on an H100 and 2.13 on a CPU).
    ``max``'s backward scatters to the recorded index. The forward values are identical.
    """
    return x.flatten(2).max(dim=2).values


def max_pool2x2(x: Tensor) -> Tensor:
    """2x2 max-pool with stride 2 (odd trailing rows and columns dropped, as ``F.max_pool2d(x, 2)``).

    On a CPU, where no gradient is needed (a frozen stem's output, evaluation) and ``x`` is
    channels_last, it is two ``maximum``s of strided views, which skip the argmax indices: 2.4x faster
    on 16 channels at 28 px on the 2-core CPU, where ``max_pool2d`` is at its slowest. Otherwise
    ``max_pool2d``, whose backward needs those indices (and which was not measured against this on GPUs).
    """
    if (x.requires_grad or x.device.type != "cpu" or x.ndim != 4
            or not x.is_contiguous(memory_format=torch.channels_last)):
        return F.max_pool2d(x, 2)
    h, w = x.size(2) // 2 * 2, x.size(3) // 2 * 2
    v = x.permute(0, 2, 3, 1)[:, :h, :w]  # NHWC, a view
    v = torch.maximum(v[:, 0::2], v[:, 1::2])
    return torch.maximum(v[:, :, 0::2], v[:, :, 1::2]).permute(0, 3, 1, 2)


class MaxPool2x2(nn.Module):
    """:func:`max_pool2x2` as a module."""

    def forward(self, x: Tensor) -> Tensor:
        return max_pool2x2(x)


class ConvNet(nn.Module):
    """A plain stack of 3x3 convs, each followed (where listed in ``pools``) by a 2x2 max-pool, then BN
    and the activation; the head is a global max over space and a bias-free linear layer.

    Pooling *before* BN and the activation (airbench's order) runs those memory-bound ops at a
    quarter of the pixels; a global max is cheaper than adaptive pooling (hlb-CIFAR10); ``logit_scale``
    tempers the initial logits of the max-pooled features.

    ``model.stem``: ``whiten`` sets the first conv by patch whitening from training images
    (``init_from_data``: its widths[0] / 2 directions of largest patch variance, both signs) and freezes
    it. Nothing below the second conv then needs a gradient: no weight gradient for the first conv and
    no backward through its pool, which on a 28 px input is most of what that layer costs in a step.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if cfg.stem == "whiten" and (cfg.widths[0] % 2 or cfg.widths[0] > 2 * in_channels * 9):
            raise ConfigError(f"model.stem=whiten needs an even widths[0] of at most 2*{in_channels}*3*3 = "
                              f"{2 * in_channels * 9} (both signs of the 3x3 patches' whitening directions); "
                              f"got {cfg.widths[0]}")
        layers: list[nn.Module] = []
        width = in_channels
        for i, w in enumerate(cfg.widths):
            layers.append(nn.Conv2d(width, w, 3, padding=1, bias=False))
            if i == 0 and cfg.stem == "whiten":
                layers[-1].weight.requires_grad_(False)  # before the optimizer is built, whatever the call order
            if i in cfg.pools:
                layers.append(MaxPool2x2())
            layers += [nn.BatchNorm2d(w), _ACTIVATIONS[cfg.activation]()]
            width = w
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.head = nn.Linear(width, num_classes, bias=False)
        self.logit_scale = cfg.logit_scale
        self.whiten, self.whiten_eps = cfg.stem == "whiten", cfg.whiten_eps

    def init_from_data(self, images: Tensor) -> None:
        """Data-dependent init: whiten the first conv on ``images`` (normalized, unaugmented training images)."""
        if self.whiten:
            init_whitening_(self.body[0], images, eps=self.whiten_eps)

    def stem_parameters(self) -> list[nn.Parameter]:
        """The first conv's parameters and the BatchNorm's after it: everything before the second conv
        (``model.stem_train_frac`` freezes them)."""
        convs = [i for i, m in enumerate(self.body) if isinstance(m, nn.Conv2d)]
        end = convs[1] if len(convs) > 1 else len(self.body)
        return [p for m in self.body[:end] for p in m.parameters()]

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """Each conv's parameters and its BatchNorm's, from the second conv on: the first is the stem
        (``model.block_train_fracs`` freezes them)."""
        convs = [i for i, m in enumerate(self.body) if isinstance(m, nn.Conv2d)] + [len(self.body)]
        return [[p for m in self.body[a:b] for p in m.parameters()] for a, b in zip(convs[1:], convs[2:])]

    def forward(self, x: Tensor) -> Tensor:
        x = global_max(self.body(x))
        return self.head(self.dropout(x)) * self.logit_scale


class MnistNet(nn.Module):
    """The network of the PyTorch examples' MNIST script, used by the ``baseline`` recipe."""

    def __init__(self, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3)
        self.conv2 = nn.Conv2d(32, 64, 3)
        h, w = (image_size[0] - 4) // 2, (image_size[1] - 4) // 2
        self.fc1 = nn.Linear(64 * h * w, 128)
        self.fc2 = nn.Linear(128, num_classes)
        self.drop1, self.drop2 = nn.Dropout(0.25), nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        x = self.drop1(torch.flatten(nn.functional.max_pool2d(x, 2), 1))
        return self.fc2(self.drop2(torch.relu(self.fc1(x))))
