"""ResNets (He et al. 2016): ResNet-50 in the v1.5 form MLPerf trains (bottleneck blocks, the stride on the
3x3), and ResNet-18 (basic blocks of two 3x3 convs).

The last BN of every residual branch is marked (``mark_residual_end``) so that zero-init of its scale
(Goyal et al. 2017: each block starts as the identity) can find it without knowing this file.
"""
from __future__ import annotations

from torch import Tensor, nn

from speedrun.config import ConfigError, ModelConfig
from speedrun.techniques.normalization import mark_residual_end

EXPANSION = 4  # a bottleneck's output is 4x its inner width
RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET18_BLOCKS = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """3x3 (stride) -> 3x3, BN after each, ReLU after the sum with the shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, width_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = mark_residual_end(nn.BatchNorm2d(width))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or width_in != width:
            self.shortcut = _downsample(width_in, width, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def _downsample(width_in: int, out: int, stride: int) -> nn.Module:
    """The projection shortcut: 1x1 conv (stride) and BN."""
    return nn.Sequential(nn.Conv2d(width_in, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 (stride) -> 1x1 (expand), BN after each, ReLU after the sum with the shortcut."""

    expansion = EXPANSION

    def __init__(self, width_in: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * EXPANSION
        self.conv1, self.bn1 = nn.Conv2d(width_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), mark_residual_end(nn.BatchNorm2d(out))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or width_in != out:
            self.shortcut = _downsample(width_in, out, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """``model.widths``: the inner width of each stage (ResNet-50: 64, 128, 256, 512; smaller for tests);
    ``model.stem``: ``conv`` is ImageNet's 7x7/2 conv and 3x3/2 max-pool (for >= 128 px images),
    ``small`` a 3x3/1 conv without pooling (CIFAR-size images keep their resolution)."""

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int,
                 blocks: tuple[int, ...] = RESNET50_BLOCKS, block: type[nn.Module] = Bottleneck) -> None:
        super().__init__()
        if len(cfg.widths) != len(blocks):
            raise ConfigError(f"model.widths must give {len(blocks)} stage widths for {cfg.name}; "
                              f"got {len(cfg.widths)}")
        stem_width = cfg.widths[0]
        if cfg.stem == "small":
            stem = [nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False)]
        else:
            stem = [nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)]
        stem += [nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True)]
        if cfg.stem != "small":
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        stages, width_in = [], stem_width
        for i, (width, n) in enumerate(zip(cfg.widths, blocks)):
            for j in range(n):
                stages.append(block(width_in, width, stride=2 if i > 0 and j == 0 else 1))
                width_in = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.stage_blocks = blocks
        self.head = nn.Linear(width_in, num_classes)
        self.logit_scale = cfg.logit_scale
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init for ReLU nets (fan-out, as the reference models)
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem_parameters(self) -> list[nn.Parameter]:
        """The stem conv's and its BatchNorm's parameters (``model.stem_train_frac`` freezes them)."""
        return list(self.stem.parameters())

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """Each stage's parameters (its residual blocks'), from the input on (``model.block_train_fracs``
        freezes them)."""
        ends = [sum(self.stage_blocks[:i + 1]) for i in range(len(self.stage_blocks))]
        return [[p for block in self.stages[a:b] for p in block.parameters()] for a, b in zip([0] + ends, ends)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x)).mean(dim=(2, 3))
        return self.head(x) * self.logit_scale
