"""Linear relaxations of the activations on a box of their inputs (used by ``linear_relaxation``).

ReLU, the clipped ReLU clip(z, 0, theta) and the one-sided clamps min(z, theta) and max(z, -theta)
are all clip(z, floor, ceil) (floor or ceil possibly infinite), piecewise linear with kinks at
floor and ceil: a line with slope a lies below (above) them on [lo, hi] iff it does at lo, hi and
the kinks inside, so each intercept is the min (max) of f(p) - a p over those points; any slope
then gives a valid line. The slopes are CROWN's (chords; 0 or 1 on the side of a kink that is
wider), and alpha-CROWN may tune the lower ones within [0, 1]. MaxMin sorts pairs (a, b):
max(a, b) = b + relu(a - b) and min(a, b) = a - relu(a - b), so one relaxation of relu(d) on the
box of d = a - b (rounded outward) relaxes both outputs.

ClippedMaxMin is MaxMin followed by clamps: min(m, theta_hi) on m = max(a, b) and max(n, -theta_lo)
on n = min(a, b). Each clamp is relaxed on the interval of its input over the box, m in
[max(lo_a, lo_b), max(hi_a, hi_b)] and n in [min(lo_a, lo_b), min(hi_a, hi_b)] (max and min are
exact in floating point, so these need no rounding), by the line the sign of its coefficient nu
asks for: nu clamp(m) >= (nu a) m + nu c. Its slope a is in [0, 1], so nu a has the sign of nu
(or is 0), and the MaxMin relaxation then runs with nu a in place of nu (``_Clamps``).

Rounding (float64, u = 2^-53): the points p and f(p) are exact floats; f(p) - a p carries at
most 2.01 u (|f(p)| + |a p|), so each intercept is moved outward by 4 u (|f(p)| + |a p|) (0 where
a is 0, or 1 with f(p) in {0, p}: then f(p) - a p is exact). The clamps' products nu a (slopes in
[0, 1]: |fl(nu a)| <= |nu|) err by at most u |nu| each, against |m|, |n|: in all at most
u ||nu|| ||(m, n)|| = u ||nu|| ||(a, b)|| <= u ||nu|| ||max(|lo|, |hi|)||; their intercept sum
nu . c errs by at most gamma_n ||nu|| ||max(|cL|, |cU|)||, and adding it to the MaxMin's constant
by u times the sum of both; ``back`` returns 4 ||nu|| (both norms) in ``mag`` for them, which
``linear_relaxation`` multiplies by 2 gamma_N (N >= 16 and >= n).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..nn.activations import ClippedMaxMin, ClippedReLU, MaxMin, ReLU
from .layers.activation import TorchReLUBounds

Tensor = torch.Tensor
_U = 2.0 ** -53  # unit roundoff of float64


#: Activations that sort channel pairs (c, c + C/2): relaxed through d = a - b.
PAIRED = (MaxMin, ClippedMaxMin)


class RelaxationNotApplicable(NotImplementedError):
    """The network has a layer the linear relaxation does not handle: the step does not apply."""


def _norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _rowdot(rows: Tensor, v: Tensor) -> Tensor:
    """rows . v per row; v is one tensor for all rows ([1, ...]) or one per row."""
    if v.shape[0] == 1:
        return rows.flatten(1) @ v.flatten()
    return (rows * v).flatten(1).sum(1)


def _clip(z: Tensor, theta: Tensor, floor=0.0) -> Tensor:
    """clip(z, floor, theta) (floor, theta: numbers or tensors, possibly infinite)."""
    floor = torch.as_tensor(floor, dtype=z.dtype)
    return torch.minimum(torch.maximum(z, floor), theta)


def _intercept(slope: Tensor, lo: Tensor, hi: Tensor, theta: Tensor, lower: bool, floor=0.0) -> Tensor:
    """min (lower) / max (upper) over lo, hi and the kinks floor, theta inside of f(p) - slope p,
    f = clip(., floor, theta), rounded outward: the line slope z + intercept is below (above) f on [lo, hi]."""
    def inside(k):
        return torch.where((lo < k) & (k < hi), k, lo)
    floor = torch.as_tensor(floor, dtype=lo.dtype)
    pts = torch.stack([lo, hi, inside(floor.expand_as(lo)), inside(theta.expand_as(lo))], -1)
    fp = _clip(pts, theta.unsqueeze(-1), floor.unsqueeze(-1) if floor.dim() else floor)
    ap = slope.unsqueeze(-1) * pts
    exact = (slope == 0).unsqueeze(-1) | ((slope == 1).unsqueeze(-1) & ((fp == pts) | (fp == 0)))
    slack = torch.where(exact, torch.zeros_like(fp), 4 * _U * (fp.abs() + ap.abs()))
    v = fp - ap
    return (v - slack).amin(-1) if lower else (v + slack).amax(-1)


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    return a / torch.where(b > 0, b, torch.ones_like(b))


def _default_slopes(lo: Tensor, hi: Tensor, theta: Tensor, floor=0.0) -> Tuple[Tensor, Tensor, Tensor]:
    """(lower slope, upper slope, unstable) of CROWN for clip(z, floor, theta) on [lo, hi] (theta = inf:
    ReLU; floor = -inf: min(z, theta)).

    Stable neurons (at the floor, saturated, linear) get their exact slope 0 or 1."""
    theta = theta.expand_as(lo)
    floor = torch.as_tensor(floor, dtype=lo.dtype).expand_as(lo)
    linear = (lo >= floor) & (hi <= theta)
    unstable = ~((hi <= floor) | (lo >= theta) | linear)
    p0, p1 = torch.maximum(lo, floor), torch.minimum(hi, theta)
    a_lower = _safe_div(_clip(hi, theta, floor) - _clip(p0, theta, floor), hi - p0)
    a_lower = torch.where((lo < floor) & (floor - lo > hi - floor), torch.zeros_like(lo), a_lower)
    a_upper = _safe_div(_clip(p1, theta, floor) - _clip(lo, theta, floor), p1 - lo)
    a_upper = torch.where((hi > theta) & (hi - theta > theta - lo), torch.zeros_like(lo), a_upper)
    exact = linear.to(lo.dtype)
    return (torch.where(unstable, a_lower.clamp(0, 1), exact), torch.where(unstable, a_upper.clamp(0, 1), exact),
            unstable)


def _sorted_box(lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
    """The box of (max(a, b), min(a, b)) per pair over the box of (a, b): exact (max, min do not round)."""
    (la, lb), (ua, ub) = lo.chunk(2, dim=1), hi.chunk(2, dim=1)
    return (torch.cat([torch.maximum(la, lb), torch.minimum(la, lb)], dim=1),
            torch.cat([torch.maximum(ua, ub), torch.minimum(ua, ub)], dim=1))


def _clamp_levels(act: ClippedMaxMin, like: Tensor) -> Tuple[Tensor, Tensor]:
    """(floor, ceil) of the clamps on v = (m, n): min(m, theta_hi) = clip(m, -inf, theta_hi),
    max(n, -theta_lo) = clip(n, -theta_lo, inf)."""
    th, tl = act.theta_hi.detach().to(like.dtype), act.theta_lo.detach().to(like.dtype)
    inf = torch.full_like(th, math.inf)
    return torch.cat([-inf, -tl]).unsqueeze(0), torch.cat([th, inf]).unsqueeze(0)


class _Clamps:
    """Lines below and above ClippedMaxMin's clamps on the box of v = (max(a, b), min(a, b))."""

    def __init__(self, act: ClippedMaxMin, lo: Tensor, hi: Tensor):
        lo, hi = _sorted_box(lo, hi)
        floor, ceil = _clamp_levels(act, lo)
        self.a_lower, self.a_upper, _ = _default_slopes(lo, hi, ceil, floor)
        self.c_lower = _intercept(self.a_lower, lo, hi, ceil, lower=True, floor=floor)
        self.c_upper = _intercept(self.a_upper, lo, hi, ceil, lower=False, floor=floor)
        self.c_norm = _norm(torch.maximum(self.c_lower.abs(), self.c_upper.abs()))
        self.v_norm = _norm(torch.maximum(lo.abs(), hi.abs()))  # >= ||(m, n)|| = ||(a, b)||

    def back(self, nu: Tensor, s: int, support: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(t, const, mag): nu . clamp(v) >= t . v + const on the box, t = nu a (lower line where nu >= 0).
        ``support``: nu holds only these (flattened) coordinates."""
        def pick(t: Tensor) -> Tensor:
            return t[s:s + 1] if support is None else t[s:s + 1].flatten(1)[:, support]
        lower = nu >= 0
        slope = torch.where(lower, pick(self.a_lower), pick(self.a_upper))
        intercept = torch.where(lower, pick(self.c_lower), pick(self.c_upper))
        return nu * slope, _rowdot(nu, intercept), 4 * _norm(nu) * (self.c_norm[s] + self.v_norm[s])


class Relaxation:
    """Lines below and above one activation layer on its pre-activation box, for every sample.

    The relaxed variable v is z itself (elementwise activations) or d = a - b per (clipped) MaxMin
    pair; the clamps of clipped MaxMin have their own lines (``clamps``), which alpha does not tune."""

    def __init__(self, act: nn.Module, lo: Tensor, hi: Tensor):
        self.pairs = isinstance(act, PAIRED)
        self.clamps = _Clamps(act, lo, hi) if isinstance(act, ClippedMaxMin) else None
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
                                          f"(ReLU, ClippedReLU, MaxMin and ClippedMaxMin are)")
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
        nu holds only these (flattened) coordinates, the others being 0; for pairs it is closed
        under c <-> c + C/2 and sorted, so its first half indexes the pairs (and d)."""
        relaxed = support if support is None or not self.pairs else support[:support.numel() // 2]

        def pick(t: Tensor) -> Tensor:
            return t[s:s + 1] if relaxed is None else t[s:s + 1].flatten(1)[:, relaxed]
        a_lo, a_up, c_lo, c_up, c_norm = (pick(self.a_lower), pick(self.a_upper), pick(self.c_lower),
                                          pick(self.c_upper), self.c_norm[s])
        if alpha is not None:
            clamped = alpha + (alpha.clamp(0, 1) - alpha).detach()  # in [0, 1], gradient 1 at the ends too
            a_lo = torch.where(self.unstable[s:s + 1], clamped, a_lo)
            c_lo = _intercept(a_lo, self.lo[s:s + 1].expand_as(a_lo), self.hi[s:s + 1].expand_as(a_lo),
                              self.theta, lower=True)
            c_norm = _norm(torch.maximum(c_lo.abs(), c_up.abs()))
        clamp_const, clamp_mag = 0.0, 0.0
        if self.clamps is not None:  # through the clamps first: nu becomes the coefficients of (m, n)
            nu, clamp_const, clamp_mag = self.clamps.back(nu, s, support)
        if self.pairs:
            nu_max, nu_min = nu.chunk(2, dim=1)
            w = nu_max - nu_min  # coefficient of relu(d): nu_max (b + relu(d)) + nu_min (a - relu(d))
        else:
            w = nu
        neg = w.clamp_max(0)  # lower line where w > 0, upper line where w < 0
        kappa = torch.addcmul(w * a_lo, neg, a_up - a_lo)
        const = _rowdot(w, c_lo) + _rowdot(neg, c_up - c_lo) + clamp_const
        mu = torch.cat([nu_min + kappa, nu_max - kappa], dim=1) if self.pairs else kappa
        return mu, const, 4 * _norm(w) * c_norm + clamp_mag


SUPPORTED = (ReLU, nn.ReLU, TorchReLUBounds, ClippedReLU, MaxMin, ClippedMaxMin)


def check_supported(act: nn.Module) -> None:
    if not isinstance(act, SUPPORTED):
        raise RelaxationNotApplicable(f"linear relaxation: activation {type(act).__name__} is not supported "
                                      f"(ReLU, ClippedReLU, MaxMin and ClippedMaxMin are)")


def unstable_neurons(act: nn.Module, lo: Tensor, hi: Tensor) -> Tensor:
    """Neurons whose activation is not affine on the box (MaxMin: both members of an overlapping pair;
    clipped MaxMin: of a pair whose relaxation is not exact, an overlap reaching an unsaturated
    output or a clamp whose kink is inside its input's interval)."""
    if isinstance(act, PAIRED):
        (la, lb), (ua, ub) = lo.chunk(2, dim=1), hi.chunk(2, dim=1)
        overlap = (la < ub) & (lb < ua)
        if isinstance(act, ClippedMaxMin):
            (m_lo, n_lo), (m_hi, n_hi) = (t.chunk(2, dim=1) for t in _sorted_box(lo, hi))
            (_, floor), (ceil, _) = (t.chunk(2, dim=1) for t in _clamp_levels(act, lo))
            varies = (m_lo < ceil) | (n_hi > floor)  # some output is not saturated on the whole box
            overlap = (overlap & varies) | ((m_lo < ceil) & (m_hi > ceil)) | ((n_lo < floor) & (n_hi > floor))
        return torch.cat([overlap, overlap], dim=1)
    theta = act.theta.detach().to(lo.dtype) if isinstance(act, ClippedReLU) else torch.tensor(math.inf)
    return ((lo < 0) & (hi > 0)) | ((lo < theta) & (hi > theta))


def magnitude(act: nn.Module, lo: Tensor, hi: Tensor) -> Tensor:
    """Per coordinate, bounds whose norm bounds both ||z|| and ||act(z)|| on the box [lo, hi]."""
    big = torch.maximum(lo.abs(), hi.abs())
    if isinstance(act, ClippedReLU):  # |clip(z, 0, theta)| <= max(|z|, -theta)
        big = torch.maximum(big, (-act.theta.detach().to(lo.dtype)).clamp_min(0))
    elif isinstance(act, ClippedMaxMin):
        # Thresholds >= 0: the clamps only shrink |m|, |n|, and ||(m, n)|| = ||(a, b)||. A negative one
        # (-t > 0) allows |output| up to t: that pair takes max(|a|, |b|, t) on both coordinates.
        floor, ceil = _clamp_levels(act, lo)
        t_hi, t_lo = (-ceil[:, :ceil.shape[1] // 2]).clamp_min(0), floor[:, floor.shape[1] // 2:].clamp_min(0)
        ba, bb = big.chunk(2, dim=1)
        both, wide = torch.maximum(ba, bb), (t_hi > 0) | (t_lo > 0)
        big = torch.cat([torch.where(wide, torch.maximum(both, t_hi), ba),
                         torch.where(wide, torch.maximum(both, t_lo), bb)], dim=1)
    return big
