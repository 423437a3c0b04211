import math

import pytest
import torch
from torch import nn

import speedrun
from speedrun.config import ConfigError, Recipe
from speedrun.techniques.large_batch import LAMB, LARS, linear_scaled_lr, trust_ratio, weight_decay_coefficient
from speedrun.techniques.registry import TECHNIQUES
from speedrun.techniques.optimizers import build_optimizer
from tests.conftest import TINY


def _param(values, grad):
    p = nn.Parameter(torch.tensor(values))
    p.grad = torch.tensor(grad)
    return p


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_two_steps_by_hand(nesterov):
    lr, m, wd, eta = 2.0, 0.9, 0.1, 0.01
    w, g = [3.0, 4.0], [0.6, -0.8]
    p = _param(w, g)
    opt = LARS([p], lr=lr, momentum=m, weight_decay=wd, trust_coefficient=eta, nesterov=nesterov)
    v = [0.0, 0.0]
    for step in range(2):
        opt.step()
        local = eta * _norm(w) / (_norm(g) + wd * _norm(w))  # step 1: 0.01 * 5 / (1 + 0.5) = 1/30
        d = [lr * local * (gi + wd * wi) for gi, wi in zip(g, w)]
        v = [m * vi + di for vi, di in zip(v, d)]
        w = [wi - (m * vi + di if nesterov else vi) for wi, vi, di in zip(w, v, d)]
        assert p.detach().tolist() == pytest.approx(w, rel=1e-6), f"step {step + 1}"


def test_lars_without_adaptation_is_sgd():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3, 2))
    b.data.copy_(a.data)
    lars = LARS([{"params": [a], "adapt": False}], lr=0.3, momentum=0.9, weight_decay=0.01, nesterov=True)
    sgd = torch.optim.SGD([b], lr=0.3, momentum=0.9, weight_decay=0.01, nesterov=True)
    for _ in range(3):
        g = torch.randn(3, 2)
        a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_trust_ratio_is_one_where_a_norm_is_zero():
    assert trust_ratio(torch.tensor(5.0), torch.tensor(2.0), 0.1).item() == pytest.approx(0.25)
    assert trust_ratio(torch.tensor(0.0), torch.tensor(2.0), 0.1).item() == 1.0
    assert trust_ratio(torch.tensor(5.0), torch.tensor(0.0)).item() == 1.0
    p = _param([0.0, 0.0], [1.0, 1.0])  # a zero-initialised layer still moves, by the plain LR
    LARS([p], lr=0.5, momentum=0.0, trust_coefficient=0.001).step()
    assert p.detach().tolist() == pytest.approx([-0.5, -0.5])


def test_lamb_one_step_by_hand():
    lr, wd, eps = 0.1, 0.1, 1e-6
    w, g = [3.0, 4.0], [0.6, -0.8]
    p = _param(w, g)
    LAMB([p], lr=lr, weight_decay=wd, eps=eps).step()
    # step 1: bias-corrected moments are g and g^2, so Adam's direction is g / (|g| + eps)
    r = [gi / (abs(gi) + eps) + wd * wi for gi, wi in zip(g, w)]
    ratio = _norm(w) / _norm(r)
    assert p.detach().tolist() == pytest.approx([wi - lr * ratio * ri for wi, ri in zip(w, r)], rel=1e-6)


def test_lamb_without_adaptation_or_decay_is_adam():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    b.data.copy_(a.data)
    lamb = LAMB([{"params": [a], "adapt": False}], lr=0.01, eps=1e-6)
    adam = torch.optim.Adam([b], lr=0.01, eps=1e-6)
    for _ in range(4):
        g = torch.randn(4)
        a.grad, b.grad = g.clone(), g.clone()
        lamb.step()
        adam.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_lamb_trust_ratio_sets_the_step_to_lr_times_the_weight_norm():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5, 5))
    p.grad = torch.randn(5, 5) * 1e3  # any gradient scale
    before = p.detach().clone()
    LAMB([p], lr=0.01).step()
    assert torch.linalg.vector_norm(p - before).item() == pytest.approx(0.01 * torch.linalg.vector_norm(before).item(),
                                                                         rel=1e-5)


def test_linear_lr_and_decay_units():
    assert linear_scaled_lr(0.5, batch_size=2048, reference_batch_size=512) == pytest.approx(2.0)
    # coupled: a group at k times the LR gets 1/k of the coefficient, the same shrink per step
    assert weight_decay_coefficient(5e-4, group_lr=6.4, base_lr=0.1, batch_size=256) * 6.4 == pytest.approx(5e-5)
    assert weight_decay_coefficient(5e-4, group_lr=0.3, base_lr=0.3, batch_size=256) == 5e-4
    # decoupled: shrink per example at the peak is weight_decay / wd_batch_size, for any batch size and LR
    for batch, lr in ((128, 0.05), (4096, 3.0)):
        coef = weight_decay_coefficient(0.02, group_lr=lr, base_lr=lr, batch_size=batch, wd_batch_size=1024)
        assert lr * coef / batch == pytest.approx(0.02 / 1024)


def _recipe(**values):
    return Recipe().override({"train.batch_size": "512", "optim.lr": "0.8", "optim.lr_batch_size": "1024", **values})


def test_decoupled_decay_in_the_optimizer_and_its_coupled_equivalent():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    recipe = _recipe(**{"optim.weight_decay": "0.01", "optim.wd_batch_size": "1024", "optim.bias_lr_scale": "4",
                        "optim.bn_weight_decay": "true"})
    groups = build_optimizer(net, recipe).param_groups
    assert [g["lr"] * g["weight_decay"] for g in groups] == pytest.approx([0.01 * 512 / 1024] * 3)
    coupled = TECHNIQUES["decoupled-weight-decay"].disable(recipe)
    assert coupled.optim.wd_batch_size == 0
    assert [g["weight_decay"] for g in build_optimizer(net, coupled).param_groups] == pytest.approx(
        [g["weight_decay"] for g in groups])
    with pytest.raises(ConfigError, match="wd_batch_size"):
        _recipe(**{"optim.wd_batch_size": "-1"})


def test_lr_scaling_record_disables_the_rule():
    record = TECHNIQUES["lr-scaling"]
    recipe = _recipe()
    assert record.enabled(recipe) and not record.enabled(record.disable(recipe))
    net = nn.Linear(2, 2)
    assert build_optimizer(net, recipe).param_groups[0]["lr"] == pytest.approx(0.4)
    assert build_optimizer(net, record.disable(recipe)).param_groups[0]["lr"] == pytest.approx(0.8)


def test_optimizer_names_build_the_layerwise_optimizers_with_norm_and_bias_groups_unadapted():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    lars = build_optimizer(net, _recipe(**{"optim.name": "lars", "optim.trust_coefficient": "0.02"}))
    assert isinstance(lars, LARS) and lars.param_groups[0]["trust_coefficient"] == 0.02
    assert [g["adapt"] for g in lars.param_groups] == [True, False]
    assert [len(g["params"]) for g in lars.param_groups] == [1, 3]
    assert isinstance(build_optimizer(net, _recipe(**{"optim.name": "lamb"})), LAMB)
    with pytest.raises(ConfigError, match="trust_coefficient"):
        _recipe(**{"optim.trust_coefficient": "0"})


@pytest.mark.parametrize("overrides", [
    {"optim.name": "lars", "optim.lr": "4.0", "optim.trust_coefficient": "0.02", "optim.wd_batch_size": "1024",
     "optim.weight_decay": "0.01"},
    {"optim.name": "lamb", "optim.lr": "0.4", "optim.weight_decay": "0.01"},
])
def test_layerwise_optimizers_train_end_to_end(synthetic_dir, overrides):
    result = speedrun.train(data=synthetic_dir, target=0.6, store=None, overrides={**TINY, **overrides})
    assert result.reached, result.detail


@pytest.mark.parametrize("make", [lambda ps: LARS(ps, lr=0.1), lambda ps: LAMB(ps, lr=0.1)])
def test_step_with_a_closure_returns_its_loss_and_uses_its_gradients(make):
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make([w])

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    before = w.detach().clone()
    assert opt.step(closure).item() == pytest.approx(5.0)
    assert not torch.equal(w.detach(), before)
