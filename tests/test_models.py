"""The airbench and ResNet-50 networks: structure against published figures, stems, init options."""
import pytest
import torch
from torch import nn

from speedrun.config import ConfigError, ModelConfig
from speedrun.models import build_model
from speedrun.models.resnet import Bottleneck
from speedrun.recipes import get_recipe
from speedrun.techniques.conv_init import whitening_filters
from speedrun.techniques.optimizers import build_optimizer


def resnet(widths=(64, 128, 256, 512), stem="conv", classes=1000):
    return build_model(ModelConfig(name="resnet50", widths=widths, pools=(), stem=stem), in_channels=3,
                       num_classes=classes, image_size=(224, 224))


def test_resnet50_has_the_published_parameter_count():
    assert sum(p.numel() for p in resnet().parameters()) == 25_557_032  # He et al.'s ResNet-50, 1000 classes


def test_zero_init_residual_zeroes_the_bn_ending_each_resnet50_branch():
    from speedrun.techniques.normalization import zero_init_residual_bn

    torch.manual_seed(0)
    model = resnet(widths=(4, 4, 8, 8), stem="small", classes=5).eval()
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16 and zero_init_residual_bn(model) == 16  # the library function, on the model
    zeroed = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and not m.weight.any()]
    assert zeroed == [b.bn3 for b in blocks]
    # every block with an identity shortcut is now the identity
    x = torch.rand(2, 16, 6, 6)  # non-negative, as a block's input (it follows a ReLU)
    identity_blocks = [b for b in blocks if isinstance(b.shortcut, nn.Identity)]
    assert len(identity_blocks) == 12
    for block in identity_blocks:
        if block.conv1.in_channels == 16:
            assert torch.equal(block(x), x)


def test_resnet_stems_and_widths():
    x = torch.randn(1, 3, 32, 32)
    assert resnet(widths=(4, 4, 4, 4), stem="small").stem(x).shape[-1] == 32
    assert resnet(widths=(4, 4, 4, 4)).stem(x).shape[-1] == 8  # 7x7/2 conv, 3x3/2 max-pool
    assert resnet(widths=(4, 4, 4, 4), classes=3).eval()(x).shape == (1, 3)
    with pytest.raises(ConfigError, match="model.widths must give 4 stage widths"):
        resnet(widths=(4, 4))


def test_models_refuse_options_they_do_not_implement():
    kw = dict(in_channels=3, num_classes=10, image_size=(32, 32))
    with pytest.raises(ConfigError, match="model 'convnet' has no model.stem='small'; it has: conv, whiten"):
        build_model(ModelConfig(stem="small"), **kw)
    with pytest.raises(ConfigError, match="even widths\\[0\\] of at most 2\\*1\\*3\\*3 = 18"):
        build_model(ModelConfig(stem="whiten", widths=(20, 8)), **{**kw, "in_channels": 1})
    with pytest.raises(ConfigError, match="model.stem=small is an option of the built-in resnet50"):
        build_model(ModelConfig(name="tests.own_models:tiny_net", stem="small"), **kw)


def airbench(**kw):
    cfg = ModelConfig(name="airbench", widths=(8, 16, 16), pools=(0, 1, 2), logit_scale=1 / 9, **kw)
    return build_model(cfg, in_channels=3, num_classes=10, image_size=(32, 32))


def test_airbench_whitening_stem_is_set_from_data_and_frozen():
    torch.manual_seed(0)
    images = torch.randn(40, 3, 16, 16)
    model = airbench(stem="whiten", whiten_eps=1e-3)
    assert model.stem.weight.shape == (24, 3, 2, 2) and not model.stem.weight.requires_grad
    model.init_from_data(images)
    assert torch.allclose(model.stem.weight, whitening_filters(images, 2, 1e-3))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = airbench(stem="conv")
    before = plain.stem.weight.detach().clone()
    plain.init_from_data(images)  # the ablation: the same layer, trainable, left at its random init
    assert plain.stem.weight.requires_grad and torch.equal(plain.stem.weight, before)


def test_convnet_whitening_stem_keeps_the_top_directions_and_takes_no_gradient_below_the_second_conv():
    torch.manual_seed(0)
    images = torch.randn(40, 1, 12, 12).cumsum(-1)  # neighbouring pixels correlated
    cfg = ModelConfig(widths=(16, 8), pools=(0,), stem="whiten", whiten_eps=1e-3)
    model = build_model(cfg, in_channels=1, num_classes=10, image_size=(12, 12))
    stem = model.body[0]
    assert not stem.weight.requires_grad
    model.init_from_data(images)
    full = whitening_filters(images, 3, 1e-3)  # 18 filters: 9 directions, then their negations
    assert torch.equal(stem.weight, torch.cat((full[:8], full[9:17])))
    x = torch.randn(4, 1, 12, 12)
    model(x).sum().backward()
    assert stem.weight.grad is None and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not model.body[1](stem(x)).requires_grad  # so autograd never runs the first pool's backward
    plain = build_model(ModelConfig(widths=(16, 8), pools=(0,)), in_channels=1, num_classes=10, image_size=(12, 12))
    before = plain.body[0].weight.detach().clone()
    plain.init_from_data(images)  # the ablation: trainable, left at its random init
    assert plain.body[0].weight.requires_grad and torch.equal(plain.body[0].weight, before)


def test_airbench_dirac_and_frozen_bn_scales():
    from types import SimpleNamespace

    from speedrun.techniques.registry import TECHNIQUES

    model = airbench()
    assert not torch.equal(model.groups[1].conv1.weight[:8, :, 1, 1], torch.eye(8, 8))
    stem = model.stem.weight.detach().clone()
    TECHNIQUES["dirac-init"].apply(SimpleNamespace(model=model))  # what a run with model.dirac does
    conv = model.groups[0].conv1  # 24 -> 8: the dirac part is all 8 filters
    assert torch.equal(conv.weight[:, :, 1, 1], torch.eye(8, 24))
    assert torch.equal(model.groups[1].conv2.weight[:, :, 1, 1], torch.eye(16, 16))
    assert torch.equal(model.stem.weight, stem)  # a 2x2 kernel has no centre: left alone
    assert not any(bn.weight.requires_grad for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))


def test_bn_bias_lr_scale_keeps_decay_per_step_and_default_groups_are_unchanged():
    recipe = get_recipe("cifar10-94").override({"model.widths": "8,16,16"})
    model = build_model(recipe.model, in_channels=3, num_classes=10, image_size=(32, 32))
    opt = build_optimizer(model, recipe)
    peak = recipe.optim.lr  # batch 1024 at lr_batch_size 1024
    norm = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    for group in opt.param_groups:
        is_norm = {id(p) in norm for p in group["params"]}
        assert len(is_norm) == 1
        scale = 64.0 if is_norm.pop() else 1.0
        assert group["peak_lr"] == pytest.approx(peak * scale)
        assert group["peak_lr"] * group["weight_decay"] == pytest.approx(peak * recipe.optim.weight_decay)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.stem.weight) not in trained and id(model.stem.bias) in trained

    fm = get_recipe("fashion-mnist").override({"optim.name": "sgd"})
    net = build_model(fm.model, in_channels=1, num_classes=10, image_size=(28, 28))
    groups = build_optimizer(net, fm).param_groups
    assert [g["weight_decay"] for g in groups] == [fm.optim.weight_decay, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim <= 1 for p in groups[1]["params"])
    assert len({g["peak_lr"] for g in groups}) == 1


@pytest.mark.parametrize("shape", [(3, 16, 28, 28), (2, 5, 7, 9), (1, 1, 2, 2)])
def test_max_pool2x2_matches_max_pool2d_with_and_without_gradient(shape):
    from speedrun.models.convnet import max_pool2x2
    torch.manual_seed(0)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 0] = float("nan")  # propagated, as max_pool2d does
    ref = nn.functional.max_pool2d(x, 2)
    fast = max_pool2x2(x)  # no gradient needed: the strided-maximum path
    assert fast.shape == ref.shape and torch.equal(fast.nan_to_num(), ref.nan_to_num())
    assert fast.isnan().equal(ref.isnan()) and fast.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(max_pool2x2(x.contiguous()).nan_to_num(), ref.nan_to_num())  # NCHW: max_pool2d
    xg = x.nan_to_num().requires_grad_()
    max_pool2x2(xg).sum().backward()  # with a gradient: max_pool2d, one 1 per window at its argmax
    assert xg.grad.sum() == ref.numel() and xg.grad.max() == 1
