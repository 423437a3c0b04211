import copy

import pytest
import torch
from torch import nn

from speedrun.techniques.small_convs import DenseGradConv2d, dense_conv3x3_weight_grad, dense_weight_grad


def _weight_grad(x, weight, grad_out):
    w = weight.detach().requires_grad_()
    torch.nn.functional.conv2d(x, w, padding=1).backward(grad_out)
    return w.grad


@pytest.mark.parametrize("channels_last", [False, True])
def test_dense_weight_grad_equals_autograd_in_fp32(channels_last):
    torch.manual_seed(0)
    x, weight = torch.randn(7, 5, 3, 3), torch.randn(6, 5, 3, 3)
    grad_out = torch.randn(7, 6, 3, 3)
    if channels_last:
        x, grad_out = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad_out))
    torch.testing.assert_close(dense_conv3x3_weight_grad(x, grad_out), _weight_grad(x, weight, grad_out),
                               rtol=1e-5, atol=1e-5)


def test_only_the_corner_taps_see_a_single_position():
    """A hand count: with all-ones input and output gradient, tap (i, j) sums over the output positions
    whose neighbour at that offset lies inside the 3x3 map: 4 at the corners, 6 at the edges, 9 at the centre."""
    g = dense_conv3x3_weight_grad(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3))
    assert g[0, 0].tolist() == [[4, 6, 4], [6, 9, 6], [4, 6, 4]]


def _pair(bias: bool):
    torch.manual_seed(1)
    plain = nn.Conv2d(8, 4, 3, padding=1, bias=bias)
    dense = copy.deepcopy(plain)
    assert dense_weight_grad(dense) == 1 and type(dense) is DenseGradConv2d
    return plain, dense


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_the_switched_conv_trains_exactly_as_the_plain_one(size, bias):
    plain, dense = _pair(bias)
    x = torch.randn(6, 8, size, size)
    grads = []
    for conv in (plain, dense):
        xi = x.clone().requires_grad_()
        out = conv(xi)
        out.pow(2).sum().backward()
        grads.append((out.detach(), xi.grad, conv.weight.grad) + ((conv.bias.grad,) if bias else ()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_it_matches_to_bf16_rounding():
    plain, dense = _pair(bias=False)
    x = torch.randn(32, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    grads = []
    for conv in (plain, dense):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).sum().backward()
        assert conv.weight.grad.dtype == torch.float32
        grads.append(conv.weight.grad)
    assert (grads[0] - grads[1]).norm() / grads[0].norm() < 2e-2


def test_only_eligible_convs_are_switched():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, stride=2),
                          nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1))
    assert dense_weight_grad(model) == 2
    assert [type(m) is DenseGradConv2d for m in model] == [True, False, False, False, True]


@pytest.mark.parametrize("setting, flags, precision, switched", [
    ("auto", {"avx512_bf16", "amx_bf16"}, "bf16", True),
    ("auto", {"avx512_bf16", "amx_bf16"}, "fp32", False),  # measured in bf16 only
    ("auto", {"avx512_bf16"}, "bf16", False),  # a Zen 5: no AMX
    ("auto", {"avx2", "fma"}, "fp32", False),
    ("on", {"avx2", "fma"}, "fp32", True),
    ("off", {"amx_bf16"}, "bf16", False),
])
def test_the_recipe_switch_resolves_by_device(monkeypatch, setting, flags, precision, switched):
    from types import SimpleNamespace

    from speedrun import cpuinfo
    from speedrun.recipes import get_recipe
    from speedrun.techniques.registry import TECHNIQUES

    monkeypatch.setattr(cpuinfo, "cpu_flags", lambda: frozenset(flags))
    recipe = get_recipe("fashion-mnist").override({"train.dense_conv_grad": setting, "train.precision": precision})
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    technique = TECHNIQUES["dense-conv-grad"]
    # auto without AMX is a no-op, not "on" (ablations skip it); with AMX in fp32 it is on and does nothing
    assert technique.enabled(recipe) == (setting == "on" or (setting == "auto" and "amx_bf16" in flags))
    if technique.enabled(recipe):
        technique.apply(SimpleNamespace(recipe=recipe, device=torch.device("cpu"), precision=precision, model=model))
    assert (type(model[0]) is DenseGradConv2d) == switched


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="torch.compile on a CPU needs g++")
def test_torch_compile_traces_the_switched_conv():
    """Dynamo traces the custom autograd function (no graph break to eager) and its gradients are the plain conv's."""
    plain, dense = _pair(bias=True)
    compiled = torch.compile(dense, fullgraph=True)  # fullgraph: a graph break would raise
    x = torch.randn(4, 8, 3, 3)
    for conv in (plain, compiled):
        conv(x).pow(2).sum().backward()
    torch.testing.assert_close(dense.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)
