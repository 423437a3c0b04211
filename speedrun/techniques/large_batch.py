"""Large batches: the linear LR rule, batch-size-free weight decay, and the layer-wise adaptive
optimizers LARS (You et al. 2017) and LAMB (You et al. 2019).

Both rescale each parameter tensor's step by a *trust ratio* of weight norm to update norm, so every
layer moves by a similar fraction of its weights however its gradient scales; this is what lets
the LR grow with the batch without the layers with large gradient-to-weight ratios diverging.

A param group with ``adapt=False`` gets no trust ratio: as in the LARS paper's reference code and
MLPerf's ResNet-50, BatchNorm parameters and biases (the groups without weight decay) are excluded
from adaptation; their norms say little about a sensible step size. ``speedrun.train.run`` builds
the groups that way.
"""
from __future__ import annotations

import torch
from torch import Tensor


def linear_scaled_lr(lr: float, *, batch_size: int, reference_batch_size: int) -> float:
    """Goyal et al. 2017's rule: ``lr`` is stated for ``reference_batch_size`` examples and a batch k times
    larger takes k times the LR, so that k small steps and one large one move the weights alike.

    >>> linear_scaled_lr(0.6, batch_size=1024, reference_batch_size=256)
    2.4
    """
    return lr * batch_size / reference_batch_size


def weight_decay_coefficient(weight_decay: float, *, group_lr: float, base_lr: float, batch_size: int,
                             wd_batch_size: int = 0) -> float:
    """The coefficient to give a param group whose peak LR is ``group_lr``, for which the weights shrink
    by ``group_lr * coefficient`` per step at the peak (SGD, AdamW; the schedule scales both alike).

    - ``wd_batch_size == 0`` (coupled, PyTorch's convention): ``weight_decay * base_lr / group_lr``: a
      group with a multiplied LR (``optim.bias_lr_scale``) decays as fast as the others, no faster.
      Per example the shrink is ``weight_decay * lr / lr_batch_size``: constant across batch sizes
      under the linear rule, but proportional to the LR, so tuning the LR also moves the decay.
    - ``wd_batch_size > 0`` (decoupled, airbench's unit): ``weight_decay * batch_size / (wd_batch_size
      * group_lr)``: the weights shrink by ``weight_decay`` per ``wd_batch_size`` examples at the peak,
      whatever the batch size and the LR. It equals the coupled form with
      ``weight_decay * lr_batch_size / (wd_batch_size * lr)``.

    >>> weight_decay_coefficient(0.01, group_lr=2.0, base_lr=2.0, batch_size=512, wd_batch_size=1024)
    0.0025
    """
    if wd_batch_size:
        return weight_decay * batch_size / (wd_batch_size * group_lr)
    return weight_decay * (base_lr / group_lr)  # exactly weight_decay for an unscaled group


def trust_ratio(weight_norm: Tensor, update_norm: Tensor, coefficient: float = 1.0) -> Tensor:
    """``coefficient * |w| / |u|``, or 1 where either norm is zero (a fresh zero-init layer, a zero step)."""
    ratio = coefficient * weight_norm / update_norm
    return torch.where((weight_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))


def _evaluate(closure):
    """The optimizer protocol's optional closure: recompute the loss (with gradients) before stepping."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise LR (the LARS paper's Algorithm 1, as in MLPerf):

        d = g + wd·w;   λ = η·|w| / (|g| + wd·|w|);   v ← m·v + lr·λ·d;   w ← w − v

    (Nesterov: ``w ← w − (m·v + lr·λ·d)``.) ``lr`` sits inside the momentum buffer, as in the paper,
    so a schedule changing it acts on new gradients only. Groups with ``adapt=False`` use λ = 1.

    >>> opt = LARS(model.parameters(), lr=5.0, momentum=0.9, weight_decay=5e-4)  # doctest: +SKIP
    """

    def __init__(self, params, lr: float, *, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, nesterov: bool = False) -> None:
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS needs lr > 0, momentum in [0, 1), weight_decay >= 0, trust_coefficient > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, nesterov=nesterov, adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            wd, m = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                d = g.add(p, alpha=wd) if wd else g.clone()
                scale = group["lr"]
                if group["adapt"]:
                    w_norm = torch.linalg.vector_norm(p)
                    scale = scale * trust_ratio(w_norm, torch.linalg.vector_norm(g) + wd * w_norm,
                                                group["trust_coefficient"])
                d.mul_(scale)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(m).add_(d)
                p.sub_(d.add(buf, alpha=m) if group["nesterov"] else buf)
        return loss


class LAMB(torch.optim.Optimizer):
    """Adam with decoupled weight decay and a layer-wise trust ratio (the LAMB paper's Algorithm 2):

        r = m̂ / (√v̂ + ε) + wd·w;   w ← w − lr·(|w| / |r|)·r

    with m̂, v̂ Adam's bias-corrected moments. Groups with ``adapt=False`` use a ratio of 1, which is
    AdamW's step with the decay applied through ``r``.
    """

    def __init__(self, params, lr: float, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0 or not all(0 <= b < 1 for b in betas) or eps <= 0 or weight_decay < 0:
            raise ValueError("LAMB needs lr > 0, betas in [0, 1), eps > 0, weight_decay >= 0")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate(closure)
        for group in self.param_groups:
            (b1, b2), eps, wd = group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                r = (m / (1 - b1**t)).div_((v / (1 - b2**t)).sqrt_().add_(eps))
                if wd:
                    r.add_(p, alpha=wd)
                scale = group["lr"]
                if group["adapt"]:
                    scale = scale * trust_ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(r))
                p.sub_(r.mul_(scale))
        return loss
