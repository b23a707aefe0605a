"""Certification: ``certify`` (per point, at one radius), ``evaluate`` (a split's accuracy) and
``certified_radius`` (per point, the largest certified radius).

A point is certified at radius eps when its prediction is the label and a lower
bound of every margin z_pred - z_j over the whole ball is strictly positive.
Ties (margin 0) and misclassified points are never certified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from .bounds import (GlobalBound, global_bound, global_margins, local_bound, local_margins,
                     penultimate, worst_margin)

Tensor = torch.Tensor


@dataclass
class Certificate:
    prediction: Tensor  # [B] predicted class at x
    correct: Tensor  # [B] prediction == label
    robust: Tensor  # [B] every margin of the prediction provably > 0 on the ball
    certified: Tensor  # [B] robust and correct
    worst_margin: Tensor  # [B] lower bound of min_j (z_pred - z_j) on the ball
    bound: Tensor  # [B] Lipschitz bound of the penultimate features used
    converged: Tensor  # [B] estimate level: the iteration converged (always True otherwise)
    iterations: List[int]
    guarantee: str  # what the certificate promises, in words
    kind: str  # "local" | "global"
    level: str = "exact"  # "probabilistic" | "exact" | "estimate" (global certificates are exact)
    info: dict = field(default_factory=dict)  # delta, steps, inflation per layer, ...


def local_guarantee(level: str, *, tol: float = 1e-4, max_iter: int = 2000, method: str = "lanczos",
                    delta: float = 1e-9, info: Optional[dict] = None) -> str:
    """One sentence on what a local-bound certificate at ``level`` promises (printed beside its numbers)."""
    if level == "probabilistic":
        layers = (info or {}).get("layers") or []
        steps = "/".join(str(layer.get("steps")) for layer in layers) or "?"
        infl = [layer.get("inflation_max") for layer in layers if layer.get("inflation_max") is not None]
        worst = f", largest inflation {100 * max(infl):.2f}%" if infl else ""
        return (f"probabilistic: each certified point is robust with probability >= 1 - {delta:g} over the "
                f"random Lanczos starts (P(false) <= {delta:g} per point; union bound over the layers). "
                f"Masked layer norms by plain Lanczos ({steps} steps per layer, full reorthogonalisation) from "
                f"a start uniform on the sphere, inflated by the Kuczynski-Wozniakowski factor and a "
                f"floating-point margin{worst}")
    if level == "exact":
        return ("exact: deterministic upper bounds of every masked layer norm (explicit Gram matrix and a "
                "Cholesky proof with its rounding error), or the layer's guaranteed global norm where the "
                "layer is over the budget")
    how = ("thick-restarted Lanczos from a random start, until the relative residual of the top Ritz pair is "
           f"<= {tol:g} (checked explicitly)" if method == "lanczos" else
           f"power iteration from a random start, until the relative residual of the Rayleigh quotient is "
           f"<= {tol:g}" + (" (tol 0: exactly max_iter iterations)" if tol <= 0 else ""))
    return (f"estimate, not a guarantee: masked layer norms by {how} (at most {max_iter} operator "
            f"applications per layer); these approach each norm from below. Margins are never below the "
            f"guaranteed global ones, and points whose iteration did not converge use the global certificate")


def certify(model: nn.Module, x: Tensor, y: Tensor, eps: Union[float, Tensor], bound: str = "local", *,
            guarantee: str = "probabilistic", delta: float = 1e-9, inflation: float = 0.01,
            steps: Optional[int] = None, max_iter: int = 2000, tol: float = 1e-4, last_layer: str = "ball_box",
            generator: Optional[torch.Generator] = None, global_result: Optional[GlobalBound] = None,
            work_dtype: Optional[torch.dtype] = torch.float32, method: str = "lanczos") -> Certificate:
    """Certify each (x_b, y_b) at l2 radius ``eps`` with the local or the global bound.

    The global bound is the guaranteed upper bound (exact SVD / FFT). The local
    bound carries ``guarantee`` ("probabilistic", "exact" or "estimate", see
    ``bounds.local_bound``); its margins are combined with the global ones (both
    are lower bounds of the true margin, so their maximum is too). At the
    estimate level, points whose iteration did not converge use the global
    margins only. Works for any plain Sequential of supported layers (the input
    shape comes from ``x``); norms and margins are computed in the model's dtype
    (float64 recommended), iterations in ``work_dtype``.
    """
    if bound not in ("local", "global"):
        raise ValueError(f"bound must be 'local' or 'global', got {bound!r}")
    if isinstance(eps, Tensor):  # one radius per sample
        if eps.shape != (x.shape[0],) or not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
            raise ValueError(f"a per-sample eps must be finite, >= 0 and of shape ({x.shape[0]},)")
    elif not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 (or one per sample), got {eps!r}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match a batch of {x.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            g = global_result or global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
            features = penultimate(model, x)
            logits = model(x)
            pred = logits.argmax(dim=1)
            m_global = global_margins(model, logits, features, pred, g.lipschitz, eps)
            info: dict = {}
            if bound == "global":
                margins = m_global
                k = g.lipschitz.expand(x.shape[0])
                converged = torch.ones_like(pred, dtype=torch.bool)
                iterations, text, level = [], g.guarantee, "exact"
            else:
                lb = local_bound(model, x, eps, guarantee=guarantee, delta=delta, inflation=inflation,
                                 steps=steps, method=method, max_iter=max_iter, tol=tol, init="random",
                                 generator=generator, work_dtype=work_dtype, global_norms=g.layer_norms)
                m_local = local_margins(model, lb, pred, last_layer)
                converged = lb.converged
                margins = torch.where(converged[:, None], torch.maximum(m_local, m_global), m_global)
                k, iterations, info, level = lb.lipschitz, lb.iterations, lb.info, guarantee
                text = local_guarantee(guarantee, tol=tol, max_iter=max_iter, method=method, delta=delta, info=info)
    finally:
        model.train(was_training)
    wm = worst_margin(margins, pred)
    correct = pred == y
    robust = wm > 0  # strictly: a tie is not certified
    return Certificate(prediction=pred, correct=correct, robust=robust, certified=robust & correct,
                       worst_margin=wm, bound=k, converged=converged, iterations=iterations,
                       guarantee=text, kind=bound, level=level, info=info)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eps: float, bound: str, *, max_iter: int = 200,
             tol: float = 1e-4, batch_size: int = 256, seed: int = 0) -> Dict[str, float]:
    """Clean and certified accuracy of a split, for model selection and calibration.

    The local bound is the (cheaper) estimate level here: it ranks candidates, it
    certifies nothing.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    g = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
    correct = certified = 0
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
        c = certify(model, xb, yb, eps, bound, guarantee="estimate", max_iter=max_iter, tol=tol, generator=gen,
                    global_result=g)
        correct += int(c.correct.sum())
        certified += int(c.certified.sum())
    n = max(x.shape[0], 1)
    return {"clean_acc": correct / n, "certified_acc": certified / n}


def certified_radius(model: nn.Module, x: Tensor, y: Optional[Tensor] = None, *, guarantee: str = "probabilistic",
                     max_radius: float = 10.0, rtol: float = 0.02, max_steps: int = 20,
                     generator: Optional[torch.Generator] = None, **kw) -> Tensor:
    """[B] the largest radius at which each point is certified (0 where it is not certified at all).

    A root search on the worst-case margin w(r) of the local-bound certificate at
    ``guarantee`` (decreasing in r): regula falsi with the Illinois modification,
    keeping a bracket [lo, hi] with w(lo) > 0 (certified) and w(hi) <= 0, until
    hi - lo <= rtol * hi; it needs a few evaluations per point where bisection needs
    many. The masks depend on the radius, so certification need not be exactly
    monotone in it: the result is a radius at which the point *was* certified. With
    ``y``, misclassified points get 0; points certified at ``max_radius`` get it.
    ``kw`` goes to ``certify``.
    """
    if not (isinstance(max_radius, (int, float)) and math.isfinite(max_radius) and max_radius > 0):
        raise ValueError(f"max_radius must be a finite number > 0, got {max_radius!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    n = x.shape[0]
    with torch.no_grad():
        logits = model.eval()(x)
    pred = logits.argmax(dim=1)
    labels = pred if y is None else y
    top2 = logits.topk(2, dim=1).values if logits.shape[1] > 1 else torch.cat([logits, logits - 1], 1)
    lo = torch.zeros(n, dtype=torch.float64)
    w_lo = (top2[:, 0] - top2[:, 1]).double().cpu()  # w(0): the clean margin
    hi = torch.full((n,), float(max_radius), dtype=torch.float64)
    w_hi = torch.full((n,), float("nan"), dtype=torch.float64)
    open_ = ((pred == labels) & (w_lo > 0)).cpu()
    # First: the top of the range.
    idx = open_.nonzero().squeeze(1)
    if idx.numel():
        w = _worst_margin_at(model, x, labels, idx, hi[idx], guarantee, generator, kw)
        ok = w > 0
        lo[idx[ok]] = hi[idx[ok]]
        open_[idx[ok]] = False
        w_hi[idx[~ok]] = w[~ok]
    side = torch.zeros(n, dtype=torch.int8)  # Illinois: which end was kept last time
    for _ in range(max_steps):
        open_ &= (hi - lo) > rtol * hi
        idx = open_.nonzero().squeeze(1)
        if not idx.numel():
            break
        a, b, wa, wb = lo[idx], hi[idx], w_lo[idx], w_hi[idx]
        t = wa / (wa - wb)  # secant root of the line through (a, w(a)) and (b, w(b))
        t = torch.where(torch.isfinite(t), t, torch.full_like(t, 0.5)).clamp(0.05, 0.95)
        r = a + t * (b - a)
        w = _worst_margin_at(model, x, labels, idx, r, guarantee, generator, kw)
        ok = w > 0
        up, down = idx[ok], idx[~ok]
        lo[up], w_lo[up] = r[ok], w[ok]
        hi[down], w_hi[down] = r[~ok], w[~ok]
        # Illinois: when the same end is kept twice in a row, halve its stored margin so the
        # secant step moves it (regula falsi would otherwise crawl).
        w_hi[up[side[up] == 1]] /= 2
        w_lo[down[side[down] == -1]] /= 2
        side[up], side[down] = 1, -1
    return torch.where((pred == labels).cpu(), lo, torch.zeros_like(lo))


def _worst_margin_at(model, x, y, idx: Tensor, radii: Tensor, guarantee, generator, kw) -> Tensor:
    """Worst-case margin of the local certificate of points ``idx``, each at its own radius."""
    out = torch.empty(idx.numel(), dtype=torch.float64)
    eps = radii.to(x.dtype).to(x.device)
    rows = idx.to(x.device)
    # One call for the whole set: the local bound takes a radius per sample.
    c = certify(model, x[rows], y[rows], eps, "local", guarantee=guarantee, generator=generator, **kw)
    out[:] = torch.where(c.correct, c.worst_margin, torch.full_like(c.worst_margin, -1.0)).double().cpu()
    return out
