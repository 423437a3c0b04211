"""Small convolutional networks for 28-32 px images."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from speedrun.config import ModelConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "celu": nn.CELU}


def conv_bn(c_in: int, c_out: int, activation: str) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
            _ACTIVATIONS[activation]()]


class ConvNet(nn.Module):
    """A stem conv at full resolution, then per width a stage: conv, max-pool 2, conv.

    Pooling right after each stage's first conv keeps most of the compute at low resolution;
    the head is a global max over space and a bias-free linear layer, scaled by ``logit_scale``.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        width = cfg.widths[0]
        layers: list[nn.Module] = conv_bn(in_channels, width, cfg.activation)
        for w in cfg.widths[1:]:
            layers += [nn.Conv2d(width, w, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(w), _ACTIVATIONS[cfg.activation]()]
            layers += conv_bn(w, w, cfg.activation)
            width = w
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.head = nn.Linear(width, num_classes, bias=False)
        self.logit_scale = cfg.logit_scale

    def forward(self, x: Tensor) -> Tensor:
        x = self.body(x).amax(dim=(2, 3))  # amax: cheaper than adaptive pooling (hlb-CIFAR10)
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
