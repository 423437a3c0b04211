"""airbench's network class (Jordan 2024, airbench94): a small k x k stem, then conv groups of
conv-pool-BN-GELU / conv-BN-GELU, a global max and a scaled linear head; no residual connections."""
from __future__ import annotations

from torch import Tensor, nn

from speedrun.config import ModelConfig
from speedrun.models.convnet import _ACTIVATIONS, global_max
from speedrun.techniques.conv_init import init_whitening_

# airbench's BN: fast running statistics (PyTorch momentum 0.4; weight averaging relies on them tracking
# the averaged weights quickly), scales frozen at 1 (only the shifts train), a tiny eps.
BN_MOMENTUM, BN_EPS = 0.4, 1e-12


def _norm(width: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(width, eps=BN_EPS, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)
    return bn


class ConvGroup(nn.Module):
    """conv 3x3 -> [2x2 max-pool] -> BN -> act -> conv 3x3 -> BN -> act (airbench: GELU). Pooling before BN (airbench's
    order) runs the memory-bound ops at a quarter of the pixels."""

    def __init__(self, width_in: int, width: int, *, pool: bool, activation: str = "gelu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width_in, width, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.norm1, self.norm2 = _norm(width), _norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.act = _ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """``model.widths``: one conv group per entry; ``model.pools``: the groups that max-pool.

    ``model.stem``: ``whiten`` makes the stem (a ``stem_kernel`` square conv, no padding, to
    2 * C * k * k channels, with bias) a frozen patch-whitening layer, set from training images by
    ``init_from_data``; ``conv`` leaves the same layer trainable at its random init (the ablation).
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        k = cfg.stem_kernel
        stem_width = 2 * in_channels * k * k
        self.stem = nn.Conv2d(in_channels, stem_width, k, bias=True)
        self.whiten, self.whiten_eps = cfg.stem == "whiten", cfg.whiten_eps
        if self.whiten:
            self.stem.weight.requires_grad_(False)  # before the optimizer is built, whatever the call order
        self.act = _ACTIVATIONS[cfg.activation]()
        groups, width = [], stem_width
        for i, w in enumerate(cfg.widths):
            groups.append(ConvGroup(width, w, pool=i in cfg.pools, activation=cfg.activation))
            width = w
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(width, num_classes, bias=False)
        self.logit_scale = cfg.logit_scale

    def init_from_data(self, images: Tensor) -> None:
        """Data-dependent init: whiten the stem on ``images`` (normalized, unaugmented training images)."""
        if self.whiten:
            init_whitening_(self.stem, images, eps=self.whiten_eps)

    def stem_parameters(self) -> list[nn.Parameter]:
        """The stem conv's weight and bias (``model.stem_train_frac`` freezes them)."""
        return list(self.stem.parameters())

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """Each conv group's parameters, from the input on (``model.block_train_fracs`` freezes them)."""
        return [list(g.parameters()) for g in self.groups]

    def forward(self, x: Tensor) -> Tensor:
        x = global_max(self.groups(self.act(self.stem(x))))
        return self.head(x) * self.logit_scale
