"""The weight gradient of a 3x3 convolution over a 3x3 map as one matrix product.

Nets that pool down to 3x3 px (airbench's last group, the fashion-mnist convnet's last two convs)
spend a surprising share of a CPU step in those layers' weight gradients: oneDNN's backward-weights
kernel has almost no spatial extent to work with. On a 2-core Xeon with AMX, in bf16, it ran at 5-8%
of the matmul peak there (64→96 and 96→96 at batch 256: 3.5 and 2.7 ms of a 27.5 ms step;
BENCHMARKS.md, "A third CPU kind").

Over a 3x3 map with padding 1 the convolution is a linear map from the 9·C input values to the 9·O
outputs, so the gradient of every (output position p, input position q) weight block is one product
``G[:, (p, o)]ᵀ X[:, (q, c)]`` over the batch — a (9·O × N)(N × 9·C) matmul that AMX runs well — and
the filter's tap t collects the blocks whose q - p is t's offset: 49 of the 81 (the rest would multiply
padding). The sum is taken in fp32; the result matches oneDNN's to bf16 rounding (tests check it
against autograd in fp32 to 1e-6).

``dense_weight_grad(model)`` switches every eligible ``nn.Conv2d`` (3x3 kernel, stride 1, padding 1,
no dilation or groups) to take this path whenever its input is 3x3 on a CPU; everything else, and the
forward and input gradient always, stays oneDNN's.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


# The 49 (output position p, input position q) pairs a 3x3 filter connects on a 3x3 map, positions
# numbered row-major, and the filter tap t each pair goes through: index tensors over the pairs.
_PAIRS = [(p, q, (q // 3 - p // 3 + 1) * 3 + (q % 3 - p % 3 + 1)) for p in range(9) for q in range(9)
          if abs(q // 3 - p // 3) <= 1 and abs(q % 3 - p % 3) <= 1]
_P, _Q, _TAP = (torch.tensor(column) for column in zip(*_PAIRS))


def dense_conv3x3_weight_grad(x: Tensor, grad_out: Tensor) -> Tensor:
    """d loss / d weight of a 3x3, padding-1 conv on (N, C, 3, 3) input ``x``, given (N, O, 3, 3) ``grad_out``."""
    n, c, o = x.size(0), x.size(1), grad_out.size(1)
    xs = x.permute(0, 2, 3, 1).reshape(n, 9 * c)  # (position, channel) columns: free for channels_last
    gs = grad_out.permute(0, 2, 3, 1).reshape(n, 9 * o)
    blocks = (gs.t() @ xs).view(9, o, 9, c)  # [p, o, q, c]
    taps = torch.zeros(9, o, c, dtype=torch.float32, device=x.device)
    taps.index_add_(0, _TAP.to(x.device), blocks[_P.to(x.device), :, _Q.to(x.device), :].float())
    return taps.permute(1, 2, 0).reshape(o, c, 3, 3)


class _Conv3x3DenseGrad(torch.autograd.Function):
    """conv2d(x, weight, bias, padding=1) with the weight gradient from ``dense_conv3x3_weight_grad``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = dense_conv3x3_weight_grad(x, grad_out).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


class DenseGradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, padding 1) whose weight gradient on 3x3 CPU inputs is one matmul."""

    def forward(self, x: Tensor) -> Tensor:
        training = self.training and torch.is_grad_enabled() and self.weight.requires_grad
        if not training or x.device.type != "cpu" or x.shape[-2:] != (3, 3):
            return super().forward(x)  # evaluation, export and every other shape: the plain conv
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):  # cast here, once, as autocast would have
            return _Conv3x3DenseGrad.apply(x.to(dtype), self.weight.to(dtype), bias)


def eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def dense_weight_grad(model: nn.Module) -> int:
    """Switch every eligible conv of ``model`` to ``DenseGradConv2d`` in place; returns how many."""
    convs = [m for m in model.modules() if eligible(m)]
    for conv in convs:
        conv.__class__ = DenseGradConv2d  # same parameters and state; only forward differs
    return len(convs)
