"""``certified_radius``: per point, the largest radius at which the local certificate holds."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional

import torch
from torch import nn

from ..bounds import GlobalBound, global_bound, global_margins, logit_weights, margin_lower_bounds
from ..bounds.clean import CleanPass, check_finite_weights, check_input, clean_pass
from ..bounds.settings import settings_from
from .cascade import certify, screen_worst_margin, warm_starts
from .settings import CascadeSettings

Tensor = torch.Tensor
#: fn(indices, radii) -> worst-case margins of those points at those radii (> 0: certified)
MarginAt = Callable[[Tensor, Tensor], Tensor]


def certified_radius(model: nn.Module, x: Tensor, y: Optional[Tensor] = None,
                     settings: Optional[CascadeSettings] = None, *, max_radius: float = 10.0, rtol: float = 0.02,
                     max_steps: int = 20, generator: Optional[torch.Generator] = None,
                     global_result: Optional[GlobalBound] = None, clean: Optional[CleanPass] = None,
                     **options) -> Tensor:
    """[B] the largest radius at which each point is certified (0 where it is not certified at all).

    A root search on the worst-case margin w(r) of the local certificate (``settings``: a
    ``CascadeSettings`` or keyword overrides of its fields, as ``certify`` takes them)
    (decreasing in r): regula falsi with the Illinois modification, keeping a bracket
    [lo, hi] with w(lo) > 0 (certified) and w(hi) <= 0, until hi - lo <= rtol * hi; it needs
    a few evaluations per point where bisection needs many. The masks depend on the
    radius, so certification need not be exactly monotone in it: the result is a radius
    at which the point *was* certified. With ``y``, misclassified points get 0; points
    certified at ``max_radius`` get it. ``global_result`` and ``clean`` (x's clean pass) reuse
    what the caller already has.

    With the cascade (default) the search runs on the deterministic global and box steps
    first (a few forward passes per evaluation). Then each point is tried with the screen
    (masked norms estimated from below, an upper bound of every sound certificate's margin)
    at the failing end of its bracket: where it fails there, the box radius is within
    ``rtol`` of what any sound masked bound would give (every step is monotone in the
    radius); where it certifies, the screen's root is searched and the whole cascade
    certifies just below it (or searches below, where it does not).
    ``cascade=False`` searches with one level for every point at every evaluation.
    The search does not use the linear-relaxation step (``linear_relaxation`` is ignored here): a
    point that step certifies at a radius may get a smaller radius from this search.
    """
    s = replace(settings_from(settings, CascadeSettings, options), linear_relaxation=False)
    _check_search(x, max_radius, rtol)
    check_input(model, x)
    check_finite_weights(model)
    n = x.shape[0]
    with torch.no_grad():
        model.eval()
        clean = clean or clean_pass(model, x)  # the same points at every radius: one clean forward pass
    logits = clean.logits
    pred = logits.argmax(dim=1)
    labels = pred if y is None else y
    if labels.shape != (n,):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match a batch of {n}")
    top2 = logits.topk(2, dim=1).values if logits.shape[1] > 1 else torch.cat([logits, logits - 1], 1)
    lo = torch.zeros(n, dtype=torch.float64)
    w_lo = (top2[:, 0] - top2[:, 1]).double().cpu()  # w(0): the clean margin
    hi = torch.full((n,), float(max_radius), dtype=torch.float64)
    w_hi = torch.full((n,), float("nan"), dtype=torch.float64)  # NaN: not evaluated yet
    open_ = ((pred == labels) & (w_lo > 0)).cpu()
    g = global_result
    if g is None:  # once for every evaluation of the search, not once per evaluation
        g = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
    else:
        g.check_model(model, tuple(x.shape[1:]))
    if s.cascade:
        # Every step certifies at least what the global bound does: 1.25x its closed-form radius is
        # the first upper end tried (raised while it still certifies, up to max_radius).
        r_glob = global_certified_radius(model, x, labels, g.lipschitz, clean=clean).double().cpu()
        guess = (r_glob > 0) & open_
        hi[guess] = torch.minimum(r_glob[guess] * 1.25, hi[guess])

    def margin_at(**extra) -> MarginAt:
        at = replace(s, **extra)

        def fn(idx: Tensor, radii: Tensor) -> Tensor:
            rows = idx.to(x.device)
            c = certify(model, x[rows], labels[rows], radii.to(x.dtype).to(x.device), "local", at,
                        generator=generator, global_result=g, clean=clean.select(rows))
            return torch.where(c.correct, c.worst_margin, torch.full_like(c.worst_margin, -1.0)).double().cpu()
        return fn

    if not s.cascade:
        _regula_falsi(margin_at(), lo, w_lo, hi, w_hi, open_, rtol, max_steps)
    else:
        _regula_falsi(margin_at(masked=False), lo, w_lo, hi, w_hi, open_, rtol, max_steps, top=float(max_radius))
        if s.masked and s.level != "estimate":
            screen = _screen_at(model, x, pred, labels, clean, g, steps=s.screen_steps, work_dtype=s.work_dtype,
                                last_layer=s.last_layer)
            _extend_with_masked_norms(screen, margin_at(), lo, w_lo, hi, w_hi, float(max_radius), rtol, max_steps)
        elif s.masked:
            _extend_with_masked_norms(None, margin_at(), lo, w_lo, hi, w_hi, float(max_radius), rtol, max_steps)
    return torch.where((pred == labels).cpu(), lo, torch.zeros_like(lo))


def _check_search(x: Tensor, max_radius, rtol) -> None:
    if not (isinstance(max_radius, (int, float)) and math.isfinite(max_radius) and max_radius > 0):
        raise ValueError(f"max_radius must be a finite number > 0, got {max_radius!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (0 samples)")


def _screen_at(model: nn.Module, x: Tensor, pred: Tensor, labels: Tensor, clean: CleanPass, g: GlobalBound,
               **screen_kw) -> MarginAt:
    """The screen's worst margins at per-point radii (-1 where misclassified).

    Only its masked-norm estimate and the global margins: the search asks it above the box
    step's radius, where the box step fails (it is monotone in the radius), so computing the
    boxes first, as ``certify`` would, is wasted work.
    """
    def fn(idx: Tensor, radii: Tensor) -> Tensor:
        rows = idx.to(x.device)
        eps = radii.to(x.dtype).to(x.device)
        sub, p = clean.select(rows), pred[rows]
        with torch.no_grad():
            starts = warm_starts(model, g, x.shape[1:])
            m_global = global_margins(model, sub.logits, sub.features, p, g.lipschitz, eps)
            w = screen_worst_margin(model, x[rows], p, eps, m_global, sub, starts, **screen_kw)
        return torch.where(p == labels[rows], w, torch.full_like(w, -1.0)).double().cpu()
    return fn


def _extend_with_masked_norms(screen: Optional[MarginAt], sound: MarginAt, lo, w_lo, hi, w_hi, max_radius: float,
                              rtol: float, max_steps: int) -> None:
    """Raise the box radii ``lo`` (in place) where masked norms certify beyond them by more than ``rtol``.

    The screen's margins (masked norms estimated from below) are never below a sound
    certificate's, so the screen's radius bounds the sound one from above: a point the
    screen fails at lo / (1 - rtol) keeps its box radius, which is then within ``rtol`` of
    what any sound masked bound certifies. For the others the screen's root is bracketed to
    ``rtol / 2`` and the sound cascade is asked once, ``rtol / 2`` below the screen's
    certified end (at the screen's root itself the sound margin, a little lower, is about
    0): where it certifies there, the bracket up to the screen's failing end is within
    ``rtol``. Only where it does not does a search with the sound cascade run, between the
    box radius and that point.
    """
    cand = ((lo < max_radius) & ~torch.isnan(w_hi)).nonzero().squeeze(1)
    if not cand.numel():
        return
    probe = screen or sound
    r_probe = torch.clamp(lo[cand] / (1 - rtol), max=max_radius)
    w = probe(cand, r_probe)
    up = cand[w > 0]
    if not up.numel():
        return
    box_lo, box_w = lo[up].clone(), w_lo[up].clone()
    lo[up], w_lo[up] = r_probe[w > 0], w[w > 0]
    # Masked norms move the radius by a few percent: the first upper end tried is close above.
    hi[up], w_hi[up] = torch.clamp(lo[up] * (1 + 3 * rtol), max=max_radius), float("nan")
    open_ = torch.zeros_like(lo, dtype=torch.bool)
    open_[up] = True
    if screen is None:  # the probe is the (estimate-level) cascade itself
        _regula_falsi(probe, lo, w_lo, hi, w_hi, open_, rtol, max_steps, top=max_radius)
        return
    _regula_falsi(probe, lo, w_lo, hi, w_hi, open_, rtol / 2, max_steps, top=max_radius)
    at_top = lo[up] >= max_radius  # the screen certifies the largest radius asked: ask the sound cascade there
    r_check = torch.where(at_top, lo[up], torch.maximum(lo[up] * (1 - rtol / 2), box_lo))
    w = sound(up, r_check)
    ok = w > 0
    lo[up[ok]], w_lo[up[ok]] = r_check[ok], w[ok]
    # The sound certificate fails there: search between the box radius (certified) and that point.
    bad = up[~ok]
    hi[bad], w_hi[bad] = r_check[~ok], w[~ok]
    lo[bad], w_lo[bad] = box_lo[~ok], box_w[~ok]
    open_ = torch.zeros_like(lo, dtype=torch.bool)
    open_[up] = True
    open_[up[ok & at_top]] = False  # certified at max_radius
    _regula_falsi(sound, lo, w_lo, hi, w_hi, open_, rtol, max_steps)


def _regula_falsi(fn: MarginAt, lo: Tensor, w_lo: Tensor, hi: Tensor, w_hi: Tensor, open_: Tensor, rtol: float,
                  max_steps: int, top: Optional[float] = None) -> None:
    """Shrink the brackets [lo, hi] of the ``open_`` points in place (w(lo) > 0 >= w(hi)).

    An upper end not evaluated yet (w_hi NaN) is evaluated first; where it certifies, the point
    is done at it, or, below ``top``, the bracket moves up (hi times 1.5, at most ``top``).
    """
    for _ in range(max_steps):
        idx = (open_ & torch.isnan(w_hi)).nonzero().squeeze(1)
        if not idx.numel():
            break
        w = fn(idx, hi[idx])
        ok = w > 0
        up = idx[ok]
        lo[up], w_lo[up] = hi[up], w[ok]
        w_hi[idx[~ok]] = w[~ok]
        done = up if top is None else up[hi[up] >= top]
        open_[done] = False
        more = up if top is None else up[hi[up] < top]
        if top is not None and more.numel():
            hi[more] = torch.clamp(1.5 * hi[more], max=top)
    open_ &= ~torch.isnan(w_hi)
    side = torch.zeros(lo.shape[0], dtype=torch.int8)  # Illinois: which end was kept last time
    for _ in range(max_steps):
        open_ &= (hi - lo) > rtol * hi
        idx = open_.nonzero().squeeze(1)
        if not idx.numel():
            break
        a, b, wa, wb = lo[idx], hi[idx], w_lo[idx], w_hi[idx]
        t = wa / (wa - wb)  # secant root of the line through (a, w(a)) and (b, w(b))
        t = torch.where(torch.isfinite(t), t, torch.full_like(t, 0.5)).clamp(0.05, 0.95)
        r = a + t * (b - a)
        w = fn(idx, r)
        ok = w > 0
        up, down = idx[ok], idx[~ok]
        lo[up], w_lo[up] = r[ok], w[ok]
        hi[down], w_hi[down] = r[~ok], w[~ok]
        # Illinois: when the same end is kept twice in a row, halve its stored margin so the
        # secant step moves it (regula falsi would otherwise crawl).
        w_hi[up[side[up] == 1]] /= 2
        w_lo[down[side[down] == -1]] /= 2
        side[up], side[down] = 1, -1


def global_certified_radius(model: nn.Module, x: Tensor, y: Tensor, lipschitz: Tensor,
                            clean: Optional[CleanPass] = None) -> Tensor:
    """[B] closed-form radius of the global certificate: min_j (z_y - z_j) / (K ||w_y - w_j||), 0 if wrong.

    ``clean`` is x's clean pass when the caller has it (no forward pass then)."""
    weight, bias = logit_weights(model)
    with torch.no_grad():
        clean = clean or clean_pass(model, x)
        logits = clean.logits
        pred = logits.argmax(1)
        margins = margin_lower_bounds(weight, bias, clean.features, torch.zeros_like(logits[:, 0]),
                                      pred, mode="ball")  # clean margins
        c = weight[pred][:, None, :] - weight[None, :, :]
        slope = lipschitz * c.norm(dim=-1)
        ratio = torch.where(slope > 0, margins / slope.clamp_min(torch.finfo(slope.dtype).tiny),
                            torch.full_like(margins, float("inf")))
        ratio = ratio.masked_fill(torch.nn.functional.one_hot(pred, logits.shape[1]).bool(), float("inf"))
        r = ratio.min(1).values.clamp_min(0)
    return torch.where(pred == y, r, torch.zeros_like(r))
