"""Convolution initialisations from the fast CIFAR-10 runs: patch whitening and dirac (identity) filters.

*Patch whitening* (Myrtle.ai's "How to train your ResNet"; hlb-CIFAR10; airbench): the first layer is a
small k x k convolution whose filters are the eigenvectors of the covariance of k x k image patches of
the training set, each scaled by ``1 / sqrt(eigenvalue + eps)``, once with each sign (so a following
GELU or ReLU keeps both halves of every direction). Its output is decorrelated, unit-variance input for
the rest of the network from step 0; the filters stay frozen, so the layer costs no weight gradient.

*Dirac init* (airbench): the first ``min(in, out)`` filters of a conv start as the identity, an implicit
residual connection for a net without skip connections; the other filters keep their random init.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def patch_statistics(images: Tensor, kernel_size: int, *, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) of every ``kernel_size`` x ``kernel_size`` patch of ``images``
    (N, C, H, W), with D = C * k * k in the order of a conv weight's flattened (C, k, k) filter.

    Sums are taken in float64 a chunk of images at a time, so memory stays bounded whatever N is.
    """
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    s1 = s2 = None
    for x in images.split(chunk):
        p = F.unfold(x.to(torch.float64), kernel_size).transpose(1, 2).reshape(-1, x.shape[1] * kernel_size**2)
        s1 = p.sum(0) if s1 is None else s1 + p.sum(0)
        s2 = p.T @ p if s2 is None else s2 + p.T @ p
        total += len(p)
    mean = s1 / total
    return mean, s2 / total - torch.outer(mean, mean)


def whitening_from_covariance(cov: Tensor, channels: int, kernel_size: int, *, eps: float) -> Tensor:
    """Filters (2 * D, C, k, k): eigenvectors of ``cov`` by decreasing eigenvalue, scaled by
    ``1 / sqrt(eigenvalue + eps)``, then the same filters negated."""
    eigenvalues, eigenvectors = torch.linalg.eigh(cov.to(torch.float64))  # ascending
    scaled = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]).flip(0)
    filters = scaled.reshape(-1, channels, kernel_size, kernel_size)
    return torch.cat((filters, -filters)).to(torch.float32)


def whitening_filters(images: Tensor, kernel_size: int = 2, eps: float = 5e-4) -> Tensor:
    """Patch-whitening filters (2 * C * k * k, C, k, k) for ``images`` (N, C, H, W), normalized as the
    network will see them. Convolving (mean-subtracted) patches with the first half gives outputs of
    covariance ``diag(lambda / (lambda + eps))``: the identity wherever ``eps`` is small next to the
    patch variance along that direction. ``eps`` keeps near-constant directions from being blown up.

    >>> w = whitening_filters(torch.randn(64, 3, 8, 8), kernel_size=2)
    >>> tuple(w.shape)
    (24, 3, 2, 2)
    """
    _, cov = patch_statistics(images, kernel_size)
    return whitening_from_covariance(cov, images.shape[1], kernel_size, eps=eps)


@torch.no_grad()
def init_whitening_(conv: nn.Conv2d, images: Tensor, *, eps: float = 5e-4, freeze: bool = True) -> nn.Conv2d:
    """Set ``conv`` (C -> 2 * m channels, k x k, m <= C * k * k) to whiten ``images``' patches along their
    m directions of largest variance, each filter with its negation: the full whitening when
    2 * m = 2 * C * k * k (airbench's stem), a truncated one when the layer is narrower (a 3x3 stem on
    one channel has 9 directions; 16 channels keep the top 8).

    The bias, if any, is set to ``-W @ mean`` so the outputs are zero-mean on the data (airbench leaves
    it at 0 and trains it; on normalized images the mean is near 0 anyway). With ``freeze`` the weight
    takes no gradient: only the bias trains. The padding is the conv's own.
    """
    c, k = conv.in_channels, conv.kernel_size[0]
    d = c * k * k
    if conv.kernel_size != (k, k) or conv.groups != 1 or conv.out_channels % 2 or conv.out_channels > 2 * d:
        raise ValueError(f"a whitening conv maps {c} channels to an even count of at most 2*{c}*{k}*{k} = "
                         f"{2 * d} with a square kernel; got {conv}")
    mean, cov = patch_statistics(images.to(conv.weight.device), k)
    filters = whitening_from_covariance(cov, c, k, eps=eps)
    m = conv.out_channels // 2
    filters = torch.cat((filters[:m], filters[d:d + m]))  # the top m directions, then their negations
    conv.weight.copy_(filters)
    if conv.bias is not None:
        conv.bias.copy_(-(filters.flatten(1).double() @ mean).float())
    conv.weight.requires_grad_(not freeze)
    return conv


@torch.no_grad()
def dirac_init_(conv: nn.Conv2d) -> nn.Conv2d:
    """Make output channel i pass input channel i through unchanged, for i < min(in, out), by setting
    those filters to a centred 1 (odd kernels, ``padding=k // 2``, stride 1 give an exact identity).
    Filters beyond ``in`` channels keep their init, so a widening conv is identity plus random features.

    >>> conv = dirac_init_(nn.Conv2d(2, 4, 3, padding=1, bias=False))
    >>> x = torch.randn(1, 2, 5, 5)
    >>> torch.equal(conv(x)[:, :2], x)
    True
    """
    kh, kw = conv.kernel_size
    if conv.groups != 1 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"dirac init needs an ungrouped conv with an odd kernel; got {conv}")
    n = min(conv.in_channels, conv.out_channels)
    conv.weight[:n].zero_()
    idx = torch.arange(n)
    conv.weight[idx, idx, kh // 2, kw // 2] = 1.0
    return conv
