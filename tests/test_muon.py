"""Muon: the Newton-Schulz iteration against its singular-value reference, the optimizer's two kinds
of group against hand-applied updates and torch's SGD, and the recipe switch."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from speedrun.recipes import get_recipe
from speedrun.techniques.muon import NS_COEFFICIENTS, Muon, muon_update, orthogonalize
from speedrun.techniques.registry import TECHNIQUES
from speedrun.techniques.optimizers import build_optimizer


def reference_orthogonalize(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """U f^steps(S / |M|_F) V^T from the SVD: the iteration acts on singular values alone."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    a, b, c = NS_COEFFICIENTS
    s = s / matrix.norm()
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return u @ torch.diag(s) @ vh


@pytest.mark.parametrize("shape", [(8, 72), (48, 432), (72, 8), (10, 10), (64, 576), (576, 64), (64, 100)])
@pytest.mark.parametrize("steps", [1, 5])
def test_orthogonalize_matches_the_singular_value_reference(shape, steps):
    torch.manual_seed(0)
    m = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(orthogonalize(m, steps), reference_orthogonalize(m, steps), atol=1e-9, rtol=1e-9)


def test_gram_form_is_used_for_wide_banks_and_holds_in_float32_on_nearly_low_rank_updates():
    from speedrun.techniques import muon
    torch.manual_seed(0)
    m = torch.randn(96, 3) @ torch.randn(3, 864) + 1e-3 * torch.randn(96, 864)  # a few dominant directions
    reference = reference_orthogonalize(m.double(), 5)
    calls = []
    original = muon._newton_schulz_gram
    muon._newton_schulz_gram = lambda x, steps: calls.append(x.shape) or original(x, steps)
    try:
        q, qt = orthogonalize(m), orthogonalize(m.mT)
    finally:
        muon._newton_schulz_gram = original
    assert calls == [(96, 864), (96, 864)]
    torch.testing.assert_close(q.double(), reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(qt.double(), reference.mT, atol=1e-4, rtol=0)
    torch.testing.assert_close(q, muon._newton_schulz(m / m.norm(), 5), atol=1e-4, rtol=0)


def test_orthogonalize_brings_singular_values_near_one_and_ignores_scale():
    torch.manual_seed(0)
    m = torch.randn(96, 864)
    s = torch.linalg.svdvals(orthogonalize(m))
    assert 0.6 < s.min() and s.max() < 1.25
    torch.testing.assert_close(orthogonalize(1000 * m), orthogonalize(m), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="2-D"):
        orthogonalize(torch.randn(4, 4, 3))


def test_muon_update_flattens_filter_banks_and_scales_tall_matrices():
    torch.manual_seed(0)
    g, buf = torch.randn(16, 8, 3, 3), torch.randn(16, 8, 3, 3)
    expected_buf = 0.8 * buf + g
    update = muon_update(g, buf, momentum=0.8, nesterov=True)
    torch.testing.assert_close(buf, expected_buf)
    torch.testing.assert_close(update, orthogonalize((g + 0.8 * expected_buf).reshape(16, -1)).view(16, 8, 3, 3))
    tall, tall_buf = torch.randn(40, 10), torch.zeros(40, 10)
    update = muon_update(tall, tall_buf, momentum=0.5, nesterov=False)
    torch.testing.assert_close(update, orthogonalize(tall) * math.sqrt(4.0))


def test_muon_steps_filters_by_hand_and_the_rest_exactly_like_torch_sgd():
    torch.manual_seed(0)
    conv, bn, head = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Linear(8, 4)
    twin = [nn.Parameter(p.detach().clone()) for p in (*bn.parameters(), *head.parameters())]
    filters0 = conv.weight.detach().clone()
    opt = Muon([dict(params=[conv.weight], lr=0.1, orthogonal=True),
                dict(params=[*bn.parameters(), *head.parameters()], lr=0.3, weight_decay=1e-3)],
               lr=0.3, momentum=0.9, muon_momentum=0.7, nesterov=True)
    reference = torch.optim.SGD(twin, lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-3)
    filters, buf = filters0.clone(), torch.zeros_like(filters0)
    for step in range(3):
        grads = [torch.randn_like(p) for p in (conv.weight, *twin)]
        for p, g in zip((conv.weight, *bn.parameters(), *head.parameters()), grads):
            p.grad = g.clone()
        for p, g in zip(twin, grads[1:]):
            p.grad = g.clone()
        opt.step()
        reference.step()
        filters -= 0.1 * muon_update(grads[0], buf, momentum=0.7, nesterov=True)
    torch.testing.assert_close(conv.weight.detach(), filters)
    for p, q in zip((*bn.parameters(), *head.parameters()), twin):
        torch.testing.assert_close(p.detach(), q.detach())


def test_muon_normalize_rescales_each_filter_bank_to_root_rows_before_its_step():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, bias=False)
    filters, buf = conv.weight.detach().clone() * 5.0, torch.zeros_like(conv.weight)
    with torch.no_grad():
        conv.weight.copy_(filters)
    opt = Muon([dict(params=[conv.weight], lr=0.1, orthogonal=True)], lr=0.1, muon_momentum=0.6, normalize=True)
    for step in range(3):
        grad = torch.randn_like(filters)
        conv.weight.grad = grad.clone()
        opt.step()
        filters = filters * (math.sqrt(8) / filters.norm()) - 0.1 * muon_update(grad, buf, momentum=0.6,
                                                                                nesterov=True)
    torch.testing.assert_close(conv.weight.detach(), filters)
    assert abs(filters.norm().item() - math.sqrt(8)) > 1e-3  # the step itself is not renormalized
    recipe = get_recipe("cifar10-cpu").override({"optim.muon_normalize": True})
    from speedrun.models import build_model
    model = build_model(recipe.model, in_channels=3, num_classes=10, image_size=(32, 32))
    assert [g["normalize"] for g in build_optimizer(model, recipe).param_groups if g["orthogonal"]] == [True]


def test_muon_refuses_vectors_in_orthogonal_groups_and_bad_hyperparameters():
    with pytest.raises(ValueError, match="2\\+ dims"):
        Muon([dict(params=[nn.Parameter(torch.zeros(3))], orthogonal=True)], lr=0.1)
    with pytest.raises(ValueError, match="momenta"):
        Muon([nn.Parameter(torch.zeros(3, 3))], lr=0.1, muon_momentum=1.0)


def test_recipe_switch_puts_exactly_the_conv_filters_in_the_orthogonal_group():
    from speedrun.models import build_model

    recipe = get_recipe("fashion-mnist").override({"optim.name": "muon", "optim.muon_lr": 0.05})
    model = build_model(recipe.model, in_channels=1, num_classes=10, image_size=(28, 28))
    opt = build_optimizer(model, recipe)
    assert isinstance(opt, Muon)
    ortho = [g for g in opt.param_groups if g["orthogonal"]]
    assert len(ortho) == 1 and ortho[0]["peak_lr"] == 0.05 and ortho[0]["weight_decay"] == 0.0
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
    assert len(convs) == 4  # the first of the 5 convs is the frozen whitening stem: in no group
    assert {id(p) for p in ortho[0]["params"]} == {id(p) for p in convs}
    assert not any(p is model.body[0].weight for g in opt.param_groups for p in g["params"])
    others = {id(p) for g in opt.param_groups if not g["orthogonal"] for p in g["params"]}
    assert id(model.head.weight) in others and not others & {id(p) for p in convs}
    sgd = TECHNIQUES["muon"].disable(recipe)
    assert sgd.optim.name == "sgd" and not TECHNIQUES["muon"].enabled(sgd)
    assert isinstance(build_optimizer(model, sgd), torch.optim.SGD)


def test_recipe_rejects_bad_muon_settings():
    from speedrun.config import ConfigError

    with pytest.raises(ConfigError, match="muon_momentum"):
        get_recipe("fashion-mnist").override({"optim.muon_momentum": 1.5})
