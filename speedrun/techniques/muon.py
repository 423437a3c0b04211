"""Muon (Jordan et al. 2024): momentum SGD whose update for each conv filter bank is *orthogonalized*
before it is applied, so every direction of the filter bank moves by a similar amount instead of the
few directions that dominate the gradient. It set the airbench CIFAR-10 record (94% in 2.59 s vs
3.09 s with SGD) and the NanoGPT speedruns.

For a filter bank ``W`` (out x in x k x k, flattened to out x in·k·k) with momentum update ``U``:

    B ← m·B + G;   U = G + m·B (Nesterov) or B;   W ← W − lr·√max(1, rows/cols)·NS(U)

where ``NS(U)`` approximates ``U'V'ᵀ`` of ``U = U'SV'ᵀ`` by a quintic Newton–Schulz iteration
(:func:`orthogonalize`). Parameters that are not filter banks (BatchNorm, biases, the linear head)
train with plain SGD in the same optimizer, as in airbench and the Muon reference.

``torch.optim.Muon`` exists but accepts only 2-D parameters and runs its iteration in bfloat16,
which an AVX2 CPU emulates at ~1/10 of fp32 speed; this version flattens filter banks and iterates
in the parameter's dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from speedrun.techniques.large_batch import _evaluate

# Keller Jordan's quintic: f(s) = a·s + b·s³ + c·s⁵, chosen to pull small singular values up fast.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: Tensor, steps: int = 5) -> Tensor:
    """Approximately the orthogonal factor ``UVᵀ`` of ``matrix = USVᵀ`` (2-D), by ``steps`` quintic
    Newton–Schulz iterations on ``matrix / ‖matrix‖_F``.

    Each iteration maps every singular value s to f(s) and leaves U and V alone, so the result is
    exactly ``U f^steps(S/‖matrix‖) Vᵀ``. With these coefficients five steps bring the singular values
    of a Gaussian matrix into roughly [0.7, 1.2] (one a thousandth of the norm still reaches ~0.5)
    rather than exactly 1, which trains as well (Jordan et al.) in far fewer iterations than a
    convergent polynomial needs.

    For an m x n matrix with n ≥ 2m (m the smaller side) and m ≥ ``GRAM_MIN_SIDE`` the same iterates
    are computed in the m x m Gram space (:func:`_newton_schulz_gram`): a 3x3 filter bank with as many
    inputs as outputs has n = 9m, and its orthogonalization then costs about half as many FLOPs.

    >>> q = orthogonalize(torch.randn(16, 144))  # doctest: +SKIP
    """
    if matrix.ndim != 2:
        raise ValueError(f"orthogonalize needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    x = matrix / matrix.norm().clamp_min(1e-7)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    m, n = x.shape
    x = _newton_schulz_gram(x, steps) if m >= GRAM_MIN_SIDE and n >= 2 * m else _newton_schulz(x, steps)
    return x.mT if tall else x


# Below this side the iteration is bound by per-call overhead, not FLOPs, and the Gram form's extra
# products cost more than they save (on the 2-core CPU: 32 x 144 takes 0.42 ms that way, 0.26 ms plainly;
# 96 x 864 1.24 ms against 2.13 ms).
GRAM_MIN_SIDE = 64


def _newton_schulz(x: Tensor, steps: int) -> Tensor:
    """The quintic iteration X ← aX + (bA + cA²)X with A = XXᵀ, on a wide (m ≤ n) matrix: 4m²n + 2m³
    multiply-adds per step."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


def _newton_schulz_gram(x: Tensor, steps: int) -> Tensor:
    """The iterates of :func:`_newton_schulz`, carried in m x m matrices.

    Each step multiplies X on the left by P = aI + bA + cA², a polynomial in A = XXᵀ, so X_k = Q_k X_0
    with Q_k = P_k ⋯ P_1, and since P commutes with A, A_{k+1} = P A Pᵀ = P A P. Only A_0 and the
    final Q X_0 touch the long side: 4m²n + ~8·steps·m³ FLOPs instead of steps·(4m²n + 2m³).
    """
    a, b, c = NS_COEFFICIENTS
    gram, q = x @ x.mT, None
    for _ in range(steps):
        p = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        p.diagonal().add_(a)
        q = p if q is None else p @ q
        gram = p @ gram @ p
    return q @ x


def muon_update(grad: Tensor, buffer: Tensor, *, momentum: float, nesterov: bool, steps: int = 5) -> Tensor:
    """Advance the momentum ``buffer`` in place with ``grad`` and return the orthogonalized update,
    shaped like ``grad`` and scaled by √max(1, rows/cols) (a tall matrix's rows can't all have unit norm)."""
    buffer.mul_(momentum).add_(grad)
    update = grad.add(buffer, alpha=momentum) if nesterov else buffer
    rows = update.size(0)
    flat = update.reshape(rows, -1)
    return orthogonalize(flat, steps).view(update.shape) * math.sqrt(max(1.0, rows / flat.size(1)))


class Muon(torch.optim.Optimizer):
    """Muon for the param groups marked ``orthogonal=True`` (filter banks: more than 2 dims), SGD with
    momentum and weight decay (PyTorch's) for the others.

    Orthogonal groups take ``muon_momentum`` and no weight decay: the BatchNorm after each conv makes
    a filter bank's scale irrelevant to the function, and the update's size is fixed by the
    orthogonalization, not by the gradient's. Their ``lr`` is an absolute step size, not scaled with
    the batch (``optim.muon_lr``); the schedule scales it like every group's. With ``normalize``
    (airbench94_muon) each filter bank is rescaled to norm √(rows) before its step, so ``lr`` stays the
    step's size relative to the weights instead of shrinking as they grow.

    >>> opt = Muon([dict(params=filters, lr=0.1, orthogonal=True), dict(params=rest, lr=0.6)],
    ...            lr=0.6, momentum=0.9, muon_momentum=0.8)  # doctest: +SKIP
    """

    def __init__(self, params, lr: float, *, momentum: float = 0.9, muon_momentum: float = 0.8,
                 nesterov: bool = True, weight_decay: float = 0.0, ns_steps: int = 5,
                 normalize: bool = False) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or not 0 <= muon_momentum < 1 or weight_decay < 0 or ns_steps < 1:
            raise ValueError("Muon needs lr > 0, momenta in [0, 1), weight_decay >= 0, ns_steps >= 1")
        super().__init__(params, dict(lr=lr, momentum=momentum, muon_momentum=muon_momentum, nesterov=nesterov,
                                      weight_decay=weight_decay, ns_steps=ns_steps, orthogonal=False,
                                      normalize=normalize))
        for group in self.param_groups:
            if group["orthogonal"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon's orthogonal groups take matrices or filter banks (2+ dims) only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["orthogonal"]:
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    update = muon_update(p.grad, state["momentum_buffer"], momentum=group["muon_momentum"],
                                         nesterov=group["nesterov"], steps=group["ns_steps"])
                    if group.get("normalize", False):  # absent from checkpoints before the option
                        p.mul_(math.sqrt(p.size(0)) / p.norm().clamp_min(1e-7))
                    p.add_(update, alpha=-group["lr"])
                continue
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            sgd(params, [p.grad for p in params], buffers, weight_decay=group["weight_decay"],
                momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                nesterov=group["nesterov"] and group["momentum"] > 0, maximize=False)
            if group["momentum"] > 0:
                for p, buffer in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buffer
        return loss
