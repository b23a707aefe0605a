"""1-Lipschitz activations and what the local bound needs to know about them.

Every activation here is 1-Lipschitz in l2, which is what makes the product of
(masked) layer norms a Lipschitz bound. Each one also answers, for a box
[lb, ub] of its pre-activations:

* ``interval(lb, ub)``: a box containing every output (for IBP);
* ``masks(lb, ub)``: ``(in_mask, out_mask)`` as 0/1 tensors. ``out_mask`` marks
  outputs that can still change inside the box (fixed outputs are constant, so
  they add nothing to the Lipschitz constant); ``in_mask`` marks the inputs those
  varying outputs can depend on. For elementwise activations both are equal.
* ``fixed_distance(lb, ub)``: per neuron, how far the box is from a region where
  the neuron is fixed (0 when fixed); the sparsity loss pushes it down.

Soundness of the masks: with ``d = f(z') - f(z'')`` for z', z'' in the box,
``d = out_mask * d`` and ``||d|| <= ||in_mask * (z' - z'')||`` (ReLU-type slopes are
in [0, 1]; MaxMin is a per-pair sort, and clamps are 1-Lipschitz).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..foundation.catalog import ACTIVATIONS

Tensor = torch.Tensor


def clip_above(t: Tensor, theta: Tensor) -> Tensor:
    """min(t, theta) with theta broadcast over the batch (torch.where: ~5x faster than minimum here)."""
    return torch.where(t > theta, theta, t)


def clip_below(t: Tensor, floor: Tensor) -> Tensor:
    """max(t, floor) with floor broadcast over the batch."""
    return torch.where(t < floor, floor, t)


class LipschitzActivation(nn.Module):
    """Base class: a 1-Lipschitz activation with interval and mask rules."""

    has_thresholds = False

    def interval(self, lb: Tensor, ub: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def masks(self, lb: Tensor, ub: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def fixed_distance(self, lb: Tensor, ub: Tensor) -> Optional[Tensor]:
        return None

    def clamp_thresholds_(self) -> None:
        """Keep thresholds >= 0 (called after each optimizer step)."""

    def scale_thresholds_(self, scale: float) -> None:
        """Multiply the clipping thresholds by ``scale`` (calibration)."""

    def threshold_mean(self) -> Optional[float]:
        return None


class ReLU(LipschitzActivation):
    """max(t, 0). Fixed (always off) where ub <= 0."""

    def forward(self, z: Tensor) -> Tensor:
        return torch.relu(z)

    def interval(self, lb, ub):
        return torch.relu(lb), torch.relu(ub)

    def masks(self, lb, ub):
        varying = (ub > 0).to(lb.dtype)
        return varying, varying

    def fixed_distance(self, lb, ub):
        return torch.relu(ub)


class ClippedReLU(LipschitzActivation):
    """min(max(t, 0), theta) with a learnable per-neuron theta >= 0.

    Fixed where ub <= 0 (off) or lb >= theta (saturated at theta).
    """

    has_thresholds = True

    def __init__(self, shape: Sequence[int], theta_init: float = 1.0):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.theta = nn.Parameter(torch.full(self.shape, float(theta_init)))

    def forward(self, z):
        return clip_above(torch.relu(z), self.theta)

    def interval(self, lb, ub):
        return clip_above(torch.relu(lb), self.theta), clip_above(torch.relu(ub), self.theta)

    def masks(self, lb, ub):
        varying = ((ub > 0) & (lb < self.theta)).to(lb.dtype)
        return varying, varying

    def fixed_distance(self, lb, ub):
        return torch.minimum(torch.relu(ub), torch.relu(self.theta - lb))

    @torch.no_grad()
    def clamp_thresholds_(self):
        self.theta.clamp_(min=0)

    @torch.no_grad()
    def scale_thresholds_(self, scale):
        self.theta.mul_(float(scale))

    def threshold_mean(self):
        return float(self.theta.detach().mean())

    def extra_repr(self):
        return f"shape={self.shape}"


def _halves(z: Tensor) -> Tuple[Tensor, Tensor]:
    if z.shape[1] % 2:
        raise ValueError(f"MaxMin needs an even number of channels/features, got {z.shape[1]}")
    return z.chunk(2, dim=1)


class MaxMin(LipschitzActivation):
    """Sorts pairs (channel c, channel c + C/2): outputs (max, min). Gradient-norm preserving.

    No output is ever constant, so both masks are all ones.
    """

    def forward(self, z):
        a, b = _halves(z)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)

    def interval(self, lb, ub):
        la, lb_ = _halves(lb)
        ua, ub_ = _halves(ub)
        lo = torch.cat([torch.maximum(la, lb_), torch.minimum(la, lb_)], dim=1)
        hi = torch.cat([torch.maximum(ua, ub_), torch.minimum(ua, ub_)], dim=1)
        return lo, hi

    def masks(self, lb, ub):
        ones = torch.ones_like(lb)
        return ones, ones


class ClippedMaxMin(LipschitzActivation):
    """MaxMin with learnable clamps: (min(max(a,b), theta_hi), max(min(a,b), -theta_lo)).

    The max output is fixed where max(lb_a, lb_b) >= theta_hi, the min output
    where min(ub_a, ub_b) <= -theta_lo. A pair's two inputs count as varying
    while either of its outputs varies (each output depends on both inputs).
    """

    has_thresholds = True

    def __init__(self, shape: Sequence[int], theta_init: float = 1.0):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if shape[0] % 2:
            raise ValueError(f"ClippedMaxMin needs an even number of channels/features, got {shape[0]}")
        self.shape = shape
        half = (shape[0] // 2,) + shape[1:]
        self.theta_hi = nn.Parameter(torch.full(half, float(theta_init)))
        self.theta_lo = nn.Parameter(torch.full(half, float(theta_init)))

    def forward(self, z):
        a, b = _halves(z)
        hi = clip_above(torch.maximum(a, b), self.theta_hi)
        lo = clip_below(torch.minimum(a, b), -self.theta_lo)
        return torch.cat([hi, lo], dim=1)

    def _sorted_bounds(self, lb, ub):
        la, lb_ = _halves(lb)
        ua, ub_ = _halves(ub)
        return torch.maximum(la, lb_), torch.maximum(ua, ub_), torch.minimum(la, lb_), torch.minimum(ua, ub_)

    def interval(self, lb, ub):
        max_l, max_u, min_l, min_u = self._sorted_bounds(lb, ub)
        lo = torch.cat([clip_above(max_l, self.theta_hi), clip_below(min_l, -self.theta_lo)], dim=1)
        hi = torch.cat([clip_above(max_u, self.theta_hi), clip_below(min_u, -self.theta_lo)], dim=1)
        return lo, hi

    def masks(self, lb, ub):
        max_l, _, _, min_u = self._sorted_bounds(lb, ub)
        hi_var = max_l < self.theta_hi
        lo_var = min_u > -self.theta_lo
        pair = (hi_var | lo_var).to(lb.dtype)
        out = torch.cat([hi_var, lo_var], dim=1).to(lb.dtype)
        return torch.cat([pair, pair], dim=1), out

    def fixed_distance(self, lb, ub):
        max_l, _, _, min_u = self._sorted_bounds(lb, ub)
        return torch.cat([torch.relu(self.theta_hi - max_l), torch.relu(min_u + self.theta_lo)], dim=1)

    @torch.no_grad()
    def clamp_thresholds_(self):
        self.theta_hi.clamp_(min=0)
        self.theta_lo.clamp_(min=0)

    @torch.no_grad()
    def scale_thresholds_(self, scale):
        self.theta_hi.mul_(float(scale))
        self.theta_lo.mul_(float(scale))

    def threshold_mean(self):
        return float(torch.cat([self.theta_hi.detach().flatten(), self.theta_lo.detach().flatten()]).mean())

    def extra_repr(self):
        return f"shape={self.shape}"


def clamp_thresholds(model: nn.Module) -> None:
    """Keep every clipping threshold >= 0 (after each optimizer step)."""
    for m in model.modules():
        if getattr(m, "has_thresholds", False):
            m.clamp_thresholds_()


def threshold_mean(model: nn.Module) -> Optional[float]:
    """Mean clipping threshold over the clipped layers (None without any)."""
    vals = [m.threshold_mean() for m in model.modules() if getattr(m, "has_thresholds", False)]
    return sum(vals) / len(vals) if vals else None


def make_activation(name: str, shape: Sequence[int], theta_init: float = 1.0) -> LipschitzActivation:
    """Build an activation by name for outputs of the given per-sample shape."""
    if name == "relu":
        return ReLU()
    if name == "clipped_relu":
        return ClippedReLU(shape, theta_init)
    if name == "maxmin":
        return MaxMin()
    if name == "clipped_maxmin":
        return ClippedMaxMin(shape, theta_init)
    raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
