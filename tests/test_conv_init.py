"""Patch whitening and dirac init, against reference computations written independently."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from speedrun.techniques.conv_init import dirac_init_, init_whitening_, patch_statistics, whitening_filters


def correlated_images(n: int = 48, size: int = 10, seed: int = 0) -> torch.Tensor:
    """Images whose pixels are correlated across space (a blur), across channels (a mix) and off-centre."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(n, 3, size + 2, size + 2, generator=g), 3, stride=1)
    mix = torch.tensor([[1.0, 0.6, 0.2], [0.0, 1.0, 0.4], [0.0, 0.0, 1.0]])
    return torch.einsum("dc,nchw->ndhw", mix, x) + torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)


def reference_patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """Every k x k patch as a row, by slicing (channel, then row, then column: a conv filter's order)."""
    n, _, h, w = x.shape
    return torch.cat([x[:, :, i:i + k, j:j + k].reshape(n, -1) for i in range(h - k + 1)
                      for j in range(w - k + 1)]).double()


def covariance(rows: torch.Tensor) -> torch.Tensor:
    centred = rows - rows.mean(0)
    return centred.T @ centred / len(rows)


@pytest.mark.parametrize("k", [2, 3])
def test_patch_statistics_match_sliced_patches(k):
    x = correlated_images()
    mean, cov = patch_statistics(x, k, chunk=7)  # chunks that do not divide N
    ref = reference_patches(x, k)
    assert torch.allclose(mean, ref.mean(0), atol=1e-10)
    assert torch.allclose(cov, covariance(ref), atol=1e-10)


def test_whitened_patches_have_identity_covariance():
    x = correlated_images()
    w = whitening_filters(x, kernel_size=2, eps=1e-7)
    assert w.shape == (24, 3, 2, 2) and torch.equal(w[12:], -w[:12])
    patches = reference_patches(x, 2)
    assert not torch.allclose(covariance(patches), torch.eye(12, dtype=torch.float64), atol=0.1)  # the test data is not white already
    white = patches @ w[:12].flatten(1).double().T
    assert torch.allclose(covariance(white), torch.eye(12, dtype=torch.float64), atol=1e-3)


def test_eps_shrinks_each_direction_by_lambda_over_lambda_plus_eps():
    x = correlated_images()
    patches = reference_patches(x, 2)
    eigenvalues = torch.linalg.eigvalsh(covariance(patches)).flip(0)  # decreasing, as the filters are ordered
    eps = float(eigenvalues.median())
    w = whitening_filters(x, kernel_size=2, eps=eps)[:12].flatten(1).double()
    expected = torch.diag(eigenvalues / (eigenvalues + eps))
    assert torch.allclose(covariance(patches @ w.T), expected, atol=1e-5)


def test_init_whitening_sets_a_frozen_conv_with_zero_mean_outputs():
    x = correlated_images()
    conv = nn.Conv2d(3, 24, 2)
    init_whitening_(conv, x, eps=1e-7)
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    out = conv(x).detach().permute(0, 2, 3, 1).reshape(-1, 24).double()  # one row per patch position
    assert out.mean(0).abs().max() < 1e-4
    assert torch.allclose(covariance(out[:, :12]), torch.eye(12, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(out[:, 12:], -out[:, :12], atol=1e-5)  # the bias centres both signs
    with pytest.raises(ValueError, match="2\\*3\\*2\\*2 = 24"):
        init_whitening_(nn.Conv2d(3, 26, 2), x)
    with pytest.raises(ValueError, match="an even count"):
        init_whitening_(nn.Conv2d(3, 15, 2), x)


def test_a_narrower_whitening_conv_keeps_the_directions_of_largest_variance():
    x = correlated_images()
    full, narrow = nn.Conv2d(3, 24, 2, bias=False), nn.Conv2d(3, 16, 2, padding=1, bias=False)
    init_whitening_(full, x, eps=1e-7)
    init_whitening_(narrow, x, eps=1e-7)
    assert torch.equal(narrow.weight, torch.cat((full.weight[:8], full.weight[12:20])))
    out = torch.nn.functional.conv2d(x, narrow.weight).permute(0, 2, 3, 1).reshape(-1, 16).double()
    assert torch.allclose(covariance(out[:, :8]), torch.eye(8, dtype=torch.float64), atol=1e-3)


def test_dirac_part_is_an_exact_identity_and_the_rest_keeps_its_init():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9)
    widen = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    before = widen.weight.detach().clone()
    dirac_init_(widen)
    assert torch.equal(widen(x)[:, :3], x)
    assert torch.equal(widen.weight[3:], before[3:])
    narrow = dirac_init_(nn.Conv2d(8, 4, 5, padding=2, bias=False))
    y = torch.randn(2, 8, 6, 6)
    assert torch.equal(narrow(y), y[:, :4])
    for bad in (nn.Conv2d(3, 8, 2), nn.Conv2d(4, 8, 3, groups=2)):
        with pytest.raises(ValueError, match="odd kernel"):
            dirac_init_(bad)
