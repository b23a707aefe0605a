"""Linear relaxations of the activations on a box of their inputs (used by ``linear_relaxation``).

ReLU and the clipped ReLU clip(z, 0, theta) are piecewise linear with kinks at 0 and theta: a
line with slope a lies below (above) them on [lo, hi] iff it does at lo, hi and the kinks
inside, so each intercept is the min (max) of f(p) - a p over those points; any slope then gives
a valid line. The slopes are CROWN's (chords; 0 or 1 below a ReLU), and alpha-CROWN may tune the
lower ones within [0, 1]. MaxMin sorts pairs (a, b): max(a, b) = b + relu(a - b) and
min(a, b) = a - relu(a - b), so one relaxation of relu(d) on the box of d = a - b (rounded
outward) relaxes both outputs. ClippedMaxMin is not handled (``RelaxationNotApplicable``).

Rounding (float64, u = 2^-53): the points p and f(p) are exact floats; f(p) - a p carries at
most 2.01 u (|f(p)| + |a p|), so each intercept is moved outward by 4 u (|f(p)| + |a p|) (0 where
a is 0, or 1 with f(p) in {0, p}: then f(p) - a p is exact).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..nn.activations import ClippedReLU, MaxMin, ReLU
from .layers.activation import TorchReLUBounds

Tensor = torch.Tensor
_U = 2.0 ** -53  # unit roundoff of float64


class RelaxationNotApplicable(NotImplementedError):
    """The network has a layer the linear relaxation does not handle: the step does not apply."""


def _norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _rowdot(rows: Tensor, v: Tensor) -> Tensor:
    """rows . v per row; v is one tensor for all rows ([1, ...]) or one per row."""
    if v.shape[0] == 1:
        return rows.flatten(1) @ v.flatten()
    return (rows * v).flatten(1).sum(1)


def _clip(z: Tensor, theta: Tensor) -> Tensor:
    return torch.minimum(torch.relu(z), theta)


def _intercept(slope: Tensor, lo: Tensor, hi: Tensor, theta: Tensor, lower: bool) -> Tensor:
    """min (lower) / max (upper) over lo, hi and the kinks 0, theta inside of f(p) - slope p,
    f = clip(., 0, theta), rounded outward: the line slope z + intercept is below (above) f on [lo, hi]."""
    def inside(k):
        return torch.where((lo < k) & (k < hi), k, lo)
    pts = torch.stack([lo, hi, inside(torch.zeros_like(lo)), inside(theta.expand_as(lo))], -1)
    fp = _clip(pts, theta.unsqueeze(-1))
    ap = slope.unsqueeze(-1) * pts
    exact = (slope == 0).unsqueeze(-1) | ((slope == 1).unsqueeze(-1) & ((fp == pts) | (fp == 0)))
    slack = torch.where(exact, torch.zeros_like(fp), 4 * _U * (fp.abs() + ap.abs()))
    v = fp - ap
    return (v - slack).amin(-1) if lower else (v + slack).amax(-1)


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    return a / torch.where(b > 0, b, torch.ones_like(b))


def _default_slopes(lo: Tensor, hi: Tensor, theta: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(lower slope, upper slope, unstable) of CROWN for clip(z, 0, theta) on [lo, hi] (theta = inf: ReLU).

    Stable neurons (off, saturated, linear) get their exact slope 0 or 1."""
    theta = theta.expand_as(lo)
    linear = (lo >= 0) & (hi <= theta)
    unstable = ~((hi <= 0) | (lo >= theta) | linear)
    p0, p1 = lo.clamp_min(0), torch.minimum(hi, theta)
    a_lower = _safe_div(_clip(hi, theta) - _clip(p0, theta), hi - p0)
    a_lower = torch.where((lo < 0) & (-lo > hi), torch.zeros_like(lo), a_lower)
    a_upper = _safe_div(_clip(p1, theta) - _clip(lo, theta), p1 - lo)
    a_upper = torch.where((hi > theta) & (hi - theta > theta - lo), torch.zeros_like(lo), a_upper)
    exact = linear.to(lo.dtype)
    return (torch.where(unstable, a_lower.clamp(0, 1), exact), torch.where(unstable, a_upper.clamp(0, 1), exact),
            unstable)


class Relaxation:
    """Lines below and above one activation layer on its pre-activation box, for every sample.

    The relaxed variable v is z itself (elementwise activations) or d = a - b per MaxMin pair."""

    def __init__(self, act: nn.Module, lo: Tensor, hi: Tensor):
        self.pairs = isinstance(act, MaxMin)
        if self.pairs:
            (la, lb), (ua, ub) = lo.chunk(2, dim=1), hi.chunk(2, dim=1)
            lo = torch.nextafter(la - ub, torch.full_like(la, -math.inf))  # rounded outward
            hi = torch.nextafter(ua - lb, torch.full_like(ua, math.inf))
            theta = torch.full((), math.inf, dtype=lo.dtype)
        elif isinstance(act, ClippedReLU):
            theta = act.theta.detach().to(lo.dtype)
        elif isinstance(act, (ReLU, nn.ReLU, TorchReLUBounds)):
            theta = torch.full((), math.inf, dtype=lo.dtype)
        else:
            raise RelaxationNotApplicable(f"linear relaxation: activation {type(act).__name__} is not supported "
                                          f"(ReLU, ClippedReLU and MaxMin are)")
        self.lo, self.hi, self.theta = lo, hi, theta
        self.a_lower, self.a_upper, self.unstable = _default_slopes(lo, hi, theta)
        self.c_lower = _intercept(self.a_lower, lo, hi, theta, lower=True)
        self.c_upper = _intercept(self.a_upper, lo, hi, theta, lower=False)

        big = torch.maximum(self.c_lower.abs(), self.c_upper.abs())
        self.c_norm = _norm(big)  # [B] ||max(|cL|, |cU|)||: sum |w c| <= ||w|| c_norm

    def back(self, nu: Tensor, s: int, alpha: Optional[Tensor] = None,
             support: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(mu, const, mag) per row of sample s: nu . act(z) >= mu . z + const for z in the box;
        mag: the magnitude its rounding is relative to (module docstring). ``alpha``: lower
        slopes per row for the unstable neurons (any value in [0, 1] is sound). ``support``:
        nu holds only these (flattened) coordinates, the others being 0 (elementwise layers)."""
        def pick(t: Tensor) -> Tensor:
            return t[s:s + 1] if support is None else t[s:s + 1].flatten(1)[:, support]
        a_lo, a_up, c_lo, c_up, c_norm = (pick(self.a_lower), pick(self.a_upper), pick(self.c_lower),
                                          pick(self.c_upper), self.c_norm[s])
        if alpha is not None:
            clamped = alpha + (alpha.clamp(0, 1) - alpha).detach()  # in [0, 1], gradient 1 at the ends too
            a_lo = torch.where(self.unstable[s:s + 1], clamped, a_lo)
            c_lo = _intercept(a_lo, self.lo[s:s + 1].expand_as(a_lo), self.hi[s:s + 1].expand_as(a_lo),
                              self.theta, lower=True)
            c_norm = _norm(torch.maximum(c_lo.abs(), c_up.abs()))
        if self.pairs:
            nu_max, nu_min = nu.chunk(2, dim=1)
            w = nu_max - nu_min  # coefficient of relu(d): nu_max (b + relu(d)) + nu_min (a - relu(d))
        else:
            w = nu
        neg = w.clamp_max(0)  # lower line where w > 0, upper line where w < 0
        kappa = torch.addcmul(w * a_lo, neg, a_up - a_lo)
        const = _rowdot(w, c_lo) + _rowdot(neg, c_up - c_lo)
        mu = torch.cat([nu_min + kappa, nu_max - kappa], dim=1) if self.pairs else kappa
        return mu, const, 4 * _norm(w) * c_norm


SUPPORTED = (ReLU, nn.ReLU, TorchReLUBounds, ClippedReLU, MaxMin)


def check_supported(act: nn.Module) -> None:
    if not isinstance(act, SUPPORTED):
        raise RelaxationNotApplicable(f"linear relaxation: activation {type(act).__name__} is not supported "
                                      f"(ReLU, ClippedReLU and MaxMin are)")


def unstable_neurons(act: nn.Module, lo: Tensor, hi: Tensor) -> Tensor:
    """Neurons whose activation is not affine on the box (MaxMin: both members of an overlapping pair)."""
    if isinstance(act, MaxMin):
        (la, lb), (ua, ub) = lo.chunk(2, dim=1), hi.chunk(2, dim=1)
        overlap = (la < ub) & (lb < ua)
        return torch.cat([overlap, overlap], dim=1)
    theta = act.theta.detach().to(lo.dtype) if isinstance(act, ClippedReLU) else torch.tensor(math.inf)
    return ((lo < 0) & (hi > 0)) | ((lo < theta) & (hi > theta))
