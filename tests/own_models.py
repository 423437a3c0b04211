"""Model factories of "a user's own project", importable as ``tests.own_models:<name>`` by the
own-model tests (speedrun calls a factory as ``factory(in_channels=, num_classes=, image_size=)``)."""
from __future__ import annotations

from torch import nn


def tiny_net(*, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """A plain conv net of the kind a user writes: no speedrun hooks, no marked layers."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, num_classes))


def three_classes(*, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return tiny_net(in_channels=in_channels, num_classes=3, image_size=image_size)


def not_a_module(*, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> dict:
    return {"weights": None}


def positional_only(in_channels, num_classes, image_size, /) -> nn.Module:
    return tiny_net(in_channels=in_channels, num_classes=num_classes, image_size=image_size)


NOT_CALLABLE = 3


def plain_net(*, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """No BatchNorm: a data-parallel job's gradients then equal one process's on the same global batch
    (BatchNorm normalizes each rank's share by its own statistics)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class _DiesOnRank1(nn.Sequential):
    """Kills its own process (SIGKILL, as the OOM killer would) at the training forward numbered
    $TEST_KILL_AT_FORWARD of rank 1 (none without it)."""

    calls = 0

    def forward(self, x):
        import os
        import signal

        if self.training and os.environ.get("RANK") == "1":
            type(self).calls += 1
            if str(type(self).calls) == os.environ.get("TEST_KILL_AT_FORWARD"):
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(x)


def dies_on_rank_1(*, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    return _DiesOnRank1(*plain_net(in_channels=in_channels, num_classes=num_classes, image_size=image_size))
