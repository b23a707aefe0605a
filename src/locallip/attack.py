"""l2 PGD attack used to audit certificates.

A certificate at radius eps promises z_y > z_j for every j != y on the whole
ball, so any point found with max_{j != y} z_j >= z_y breaks it. The attack is
not clipped to the [0, 1] pixel box: certificates cover the whole l2 ball.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

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


def _project(delta: Tensor, eps: float) -> Tensor:
    """delta scaled back into the ball, slightly inside the sphere so rounding never leaves it."""
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
    inside = eps * (1 - 8 * torch.finfo(delta.dtype).eps)
    return delta * (inside / norm).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = 50, restarts: int = 5,
           step_size: float = 0.1, generator: Optional[torch.Generator] = None,
           work_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Smallest margin z_y - max_{j!=y} z_j found in the l2 ball of radius eps, per sample.

    Each restart starts at a uniformly random point of the ball (the first at x
    itself) and takes ``steps`` normalized-gradient steps of ``step_size * eps``,
    projecting back onto the ball; the best (lowest) margin over all iterates is kept.

    ``work_dtype`` (e.g. float32 for a float64 model): the search runs on a copy of the model
    in that dtype (about twice as fast on CPUs), and the point it found is evaluated again in
    x's dtype: the returned margin is always the model's own margin at a point of the ball.
    """
    was_training = model.training
    model.eval()
    try:
        if work_dtype is None or work_dtype == x.dtype:
            best, _ = _search(model, x, y, eps, steps, restarts, step_size, generator)
            return best
        work = copy.deepcopy(model).to(work_dtype).eval()
        _, delta = _search(work, x.to(work_dtype), y, eps, steps, restarts, step_size, generator)
        with torch.no_grad():
            found = _margin(model, x + _project(delta.to(x.dtype), eps), y)
            return torch.minimum(_margin(model, x, y), found)
    finally:
        model.train(was_training)


def _search(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int, step_size: float,
            generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """(lowest margin over all iterates, the perturbation that reached it), per sample."""
    with torch.no_grad():
        best = _margin(model, x, y)
    best_delta = torch.zeros_like(x)
    if eps <= 0:
        return best, best_delta

    def keep(m: Tensor, delta: Tensor) -> None:
        better = m < best
        best.copy_(torch.where(better, m, best))
        best_delta.copy_(torch.where(better.view(-1, *([1] * (x.dim() - 1))), delta, best_delta))

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
                keep(m.detach(), delta.detach())
                delta = _project(delta - step_size * eps * _unit(grad), eps)
        with torch.no_grad():
            keep(_margin(model, x + delta, y), delta)
    return best, best_delta
