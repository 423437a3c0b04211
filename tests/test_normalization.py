import pytest
import torch
from torch import nn

import speedrun
from speedrun.config import ConfigError, ModelConfig, Recipe
from speedrun.models.convnet import ConvNet
from speedrun.techniques.normalization import (RESIDUAL_END, apply_norm_options, batchnorms, freeze_bn_scales,
                                               mark_residual_end, norm_biases, set_bn_momentum,
                                               zero_init_residual_bn)
from speedrun.techniques.optimizers import build_optimizer
from tests.conftest import TINY


class Block(nn.Module):
    """x + bn2(conv2(relu(bn1(conv1(x))))): the usual basic residual block, its last BN marked."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                    nn.Conv2d(c, c, 3, padding=1, bias=False), mark_residual_end(nn.BatchNorm2d(c)))

    def forward(self, x):
        return x + self.branch(x)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Block(4), Block(4))


def test_zero_init_makes_every_residual_block_the_identity():
    net = _resnet()
    x = torch.randn(2, 4, 5, 5)
    assert not torch.allclose(net[3](x), x)  # a fresh block is not the identity
    assert zero_init_residual_bn(net) == 2
    for block in (net[3], net[4]):
        assert torch.equal(block(x), x)  # train mode: the branch is exactly zero
        assert torch.equal(block.branch[1].weight, torch.ones(4))  # unmarked BNs untouched
    assert torch.equal(net[1].weight, torch.ones(4))
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    assert net[3].branch[4].weight.grad.abs().sum() > 0  # and the branches start learning at once


def test_marker_is_a_plain_attribute():
    bn = nn.BatchNorm1d(3)
    assert mark_residual_end(bn) is bn and getattr(bn, RESIDUAL_END)
    assert not hasattr(nn.BatchNorm1d(3), RESIDUAL_END)


def test_bn_momentum_and_frozen_scales():
    net = _resnet()
    assert set_bn_momentum(net, 0.4) == 5 and all(bn.momentum == 0.4 for bn in batchnorms(net))
    bn = net[1].train()
    x = torch.randn(8, 4, 3, 3) + 2.0
    bn(x)
    assert torch.allclose(bn.running_mean, 0.4 * x.mean((0, 2, 3)), atol=1e-6)  # PyTorch's convention
    assert freeze_bn_scales(net) == 5
    assert all(not bn.weight.requires_grad and bn.bias.requires_grad for bn in batchnorms(net))
    assert [id(p) for p in norm_biases(net)] == [id(bn.bias) for bn in batchnorms(net)]


def test_apply_norm_options_follows_the_recipe_and_rejects_switches_that_do_nothing():
    net = apply_norm_options(_resnet(), ModelConfig(zero_init_residual=True, bn_momentum=0.3))
    assert net[3].branch[4].weight.abs().sum() == 0 and all(bn.momentum == 0.3 for bn in batchnorms(net))
    assert all(bn.weight.requires_grad for bn in batchnorms(net))
    net = apply_norm_options(_resnet(), ModelConfig(bn_frozen_scale=True))
    assert all(not bn.weight.requires_grad for bn in batchnorms(net))
    plain = _resnet()
    before = [t.clone() for t in plain.state_dict().values()]
    apply_norm_options(plain, ModelConfig())  # the defaults change nothing
    assert all(torch.equal(a, b) for a, b in zip(before, plain.state_dict().values()))
    assert all(bn.momentum == 0.1 and bn.weight.requires_grad for bn in batchnorms(plain))
    with pytest.raises(ConfigError, match="marks no BatchNorm"):
        apply_norm_options(ConvNet(ModelConfig(widths=(4,), pools=()), 1, 2), ModelConfig(zero_init_residual=True))
    with pytest.raises(ConfigError, match="no BatchNorm"):
        apply_norm_options(nn.Linear(2, 2), ModelConfig(bn_momentum=0.5))


def test_norm_recipe_keys_are_validated():
    r = Recipe().override({"model.bn_momentum": "0.4", "model.bn_frozen_scale": "true", "optim.bias_lr_scale": "64"})
    assert (r.model.bn_momentum, r.model.bn_frozen_scale, r.optim.bias_lr_scale) == (0.4, True, 64.0)
    assert r.override({"model.bn_momentum": "none"}).model.bn_momentum is None
    for bad, match in (({"model.bn_momentum": "1.5"}, "bn_momentum"), ({"optim.bias_lr_scale": "0"}, "bias_lr_scale"),
                       ({"model.zero_init_residual": "true", "model.bn_frozen_scale": "true"}, "freeze")):
        with pytest.raises(ConfigError, match=match):
            Recipe().override(bad)


def _groups(net, **overrides):
    recipe = Recipe().override({"train.batch_size": "512", "optim.lr": "0.8", "optim.lr_batch_size": "1024",
                                "optim.weight_decay": "0.01", **overrides})
    return build_optimizer(net, recipe).param_groups


def test_bias_lr_scale_puts_bn_biases_in_their_own_group_with_the_same_decay_per_step():
    net = _resnet()
    biases = {id(p) for p in norm_biases(net)}
    default = _groups(net)
    assert [len(g["params"]) for g in default] == [5, 11]  # conv weights; BN γ, β and the conv bias
    assert [(g["lr"], g["weight_decay"]) for g in default] == [(0.4, 0.01), (0.4, 0.0)]
    weights, small, bias = _groups(net, **{"optim.bias_lr_scale": "64"})
    assert {id(p) for p in bias["params"]} == biases and not biases & {id(p) for p in small["params"]}
    assert bias["lr"] == bias["peak_lr"] == pytest.approx(0.4 * 64) and small["lr"] == 0.4
    assert bias["weight_decay"] == 0.0 and not bias["adapt"] and not small["adapt"] and weights["adapt"]
    decayed = _groups(net, **{"optim.bias_lr_scale": "64", "optim.bn_weight_decay": "true"})
    assert decayed[2]["lr"] * decayed[2]["weight_decay"] == pytest.approx(0.4 * 0.01)  # shrink per step as others
    assert decayed[1]["weight_decay"] == 0.01
    frozen = apply_norm_options(_resnet(), ModelConfig(bn_frozen_scale=True))
    assert sum(len(g["params"]) for g in _groups(frozen)) == 16 - 5  # frozen γ left out of the optimizer


def test_norm_options_train_end_to_end(synthetic_dir):
    result = speedrun.train(data=synthetic_dir, target=0.6, store=None, overrides={
        **TINY, "model.bn_momentum": "0.4", "model.bn_frozen_scale": "true", "optim.bias_lr_scale": "8"})
    assert result.reached, result.detail
    assert all(bn.momentum == 0.4 and not bn.weight.requires_grad for bn in batchnorms(result.model))
    assert all(torch.equal(bn.weight, torch.ones_like(bn.weight)) for bn in batchnorms(result.model))
