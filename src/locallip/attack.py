"""l2 PGD attack used to audit certificates.

A certificate at radius eps promises z_y > z_j for every j != y on the whole
ball, so any point found with max_{j != y} z_j >= z_y breaks it. The attack is
not clipped to the [0, 1] pixel box: certificates cover the whole l2 ball.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


def _margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j (<= 0 means the prediction y is broken)."""
    z = model(x)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).max(dim=1).values
    return z_y - other


def _unit(t: Tensor) -> Tensor:
    n = t.flatten(1).norm(dim=1).clamp_min(1e-30)
    return t / n.view(-1, *([1] * (t.dim() - 1)))


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = 50, restarts: int = 5,
           step_size: float = 0.1, generator: Optional[torch.Generator] = None) -> Tensor:
    """Smallest margin z_y - max_{j!=y} z_j found in the l2 ball of radius eps, per sample.

    Each restart starts at a uniformly random point of the ball (the first at x
    itself) and takes ``steps`` normalized-gradient steps of ``step_size * eps``,
    projecting back onto the ball; the best (lowest) margin over all iterates is kept.
    """
    was_training = model.training
    model.eval()
    best = _margin(model, x, y).detach()
    if eps <= 0:
        return best
    for r in range(restarts):
        if r == 0:
            delta = torch.zeros_like(x)
        else:
            d = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            radius = torch.rand(x.shape[0], generator=generator, dtype=x.dtype).to(x.device)
            radius = radius ** (1.0 / x[0].numel())
            delta = _unit(d) * (eps * (1 - 8 * torch.finfo(x.dtype).eps) * radius).view(-1, *([1] * (x.dim() - 1)))
        for _ in range(steps):
            delta.requires_grad_(True)
            m = _margin(model, x + delta, y)
            grad, = torch.autograd.grad(m.sum(), delta)
            with torch.no_grad():
                best = torch.minimum(best, m.detach())
                delta = delta - step_size * eps * _unit(grad)
                norm = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
                # Project slightly inside the sphere so rounding never leaves the ball.
                inside = eps * (1 - 8 * torch.finfo(x.dtype).eps)
                delta = delta * (inside / norm).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
        with torch.no_grad():
            best = torch.minimum(best, _margin(model, x + delta, y))
    model.train(was_training)
    return best
