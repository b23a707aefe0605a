"""``certify``: per point, at one radius, the cheapest sound certificate that decides it.

A point is certified at radius eps when its prediction is the label and a lower
bound of every margin z_pred - z_j over the whole ball is strictly positive.
Ties (margin 0) and misclassified points are never certified.

The local certificate is a cascade; each point stops at the first step that decides it:

1. ``global``: GloRo's margins with the guaranteed global bound (one forward pass);
2. ``box``: the local bound's boxes (IBP ∩ ball through every layer, ball ∩ box last
   layer) built on the guaranteed global layer norms: deterministic, a few forward passes;
3. masked layer norms, only for the correct points still open. First a screen: masked
   norms *estimated from below* (a few Lanczos steps warm-started at the layers' top
   singular vectors). A sound bound is never below such an estimate, and every quantity
   downstream is monotone in the norms, so a point the screen fails cannot pass with any
   sound value: it is ``excluded``. The rest get the masked norms proven ``exact``ly
   (explicit Gram matrix and a Cholesky proof) where the budget allows, and the
   ``probabilistic`` bound (inflated Lanczos) otherwise.

Every step is sound on its own and at least as tight as the one before, so the cascade
certifies a superset of the global and box steps. ``guarantee`` is the weakest guarantee
allowed: "probabilistic" (default) lets step 3 fall back to the probabilistic bound,
"exact" falls back to the global norm instead (deterministic everywhere), "estimate"
replaces step 3 by the estimate itself (the references' level, labelled as such).
``cascade=False`` computes one level for every point (no shortcut).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ..bounds import (GlobalBound, box_bound, global_bound, global_margins, local_bound, local_margins,
                      top_singular_vectors, worst_margin)
from ..bounds.localbound import GUARANTEE_LEVELS, CleanPass, check_input, clean_pass
from .guarantees import cascade_guarantee, local_guarantee

Tensor = torch.Tensor

#: What decided each point (``Certificate.step``): the first five certify it, the rest do not.
STEPS = ("global", "box", "exact", "probabilistic", "estimate", "misclassified", "excluded", "not_certified")
CERTIFYING_STEPS = STEPS[:5]
DETERMINISTIC_STEPS = ("global", "box", "exact")
STEP = {name: i for i, name in enumerate(STEPS)}
#: Default Lanczos steps of the screen (estimates from below; more steps exclude more points).
SCREEN_STEPS = 8
#: Masked step: a layer whose masked norm is within this fraction of its global norm (by an
#: estimate from below) takes the global norm, without a proof (it loses at most this much).
NEAR_GLOBAL = 1e-3
#: Estimates from below (screen, estimate step): a layer whose warm-start Rayleigh quotient is within
#: this fraction of the layer's norm takes that quotient and skips the Lanczos steps.
WARM_ENOUGH = 1e-4
_FROM_BELOW = dict(init="global", masked_norms="adaptive", adaptive_tol=WARM_ENOUGH, adaptive_from_below=True)


@dataclass
class Certificate:
    prediction: Tensor  # [B] predicted class at x
    correct: Tensor  # [B] prediction == label
    robust: Tensor  # [B] every margin of the prediction provably > 0 on the ball
    certified: Tensor  # [B] robust and correct
    worst_margin: Tensor  # [B] best lower bound found of min_j (z_pred - z_j) on the ball
    bound: Tensor  # [B] Lipschitz bound of the penultimate features of the deciding step
    converged: Tensor  # [B] estimate level: the iteration converged (always True otherwise)
    iterations: List[int]
    guarantee: str  # what the certificate promises, in words
    kind: str  # "local" | "global"
    level: str = "exact"  # "probabilistic" | "exact" | "estimate" (global certificates are exact)
    info: dict = field(default_factory=dict)  # delta, steps, inflation per layer, points per step, ...
    step: Optional[Tensor] = None  # [B] index into STEPS: the step that decided the point
    deterministic: Optional[Tensor] = None  # [B] the point's certificate rests on no random start

    def step_names(self) -> List[str]:
        return [STEPS[int(s)] for s in self.step]

    def step_counts(self) -> Dict[str, int]:
        """Certified points per certifying step."""
        cert = self.step[self.certified]
        return {name: int((cert == STEP[name]).sum()) for name in CERTIFYING_STEPS}


def check_radius_arg(eps, x: Tensor) -> None:
    if isinstance(eps, Tensor):  # one radius per sample
        if eps.shape != (x.shape[0],) or not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
            raise ValueError(f"a per-sample eps must be finite, >= 0 and of shape ({x.shape[0]},)")
    elif not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 (or one per sample), got {eps!r}")


def certify(model: nn.Module, x: Tensor, y: Tensor, eps: Union[float, Tensor], bound: str = "local", *,
            guarantee: str = "probabilistic", cascade: bool = True, masked: bool = True,
            screen_steps: int = SCREEN_STEPS, delta: float = 1e-9, inflation: float = 0.01,
            steps: Optional[int] = None, max_iter: int = 2000, tol: float = 1e-4, last_layer: str = "ball_box",
            generator: Optional[torch.Generator] = None, global_result: Optional[GlobalBound] = None,
            work_dtype: Optional[torch.dtype] = torch.float32, method: str = "lanczos",
            clean: Optional[CleanPass] = None) -> Certificate:
    """Certify each (x_b, y_b) at l2 radius ``eps`` with the local (cascade) or the global bound.

    The global bound is the guaranteed upper bound (exact SVD / FFT). The local certificate
    is the cascade of the module docstring (``masked=False`` stops it after the box step);
    ``cascade=False`` computes ``bounds.local_bound`` at ``guarantee`` for every point and
    combines its margins with the global ones. Works for any plain Sequential of supported
    layers (the input shape comes from ``x``); norms and margins are computed in the model's
    dtype (float32 or float64; float64 recommended), iterations in ``work_dtype``. ``clean`` is
    x's clean forward pass (``bounds.clean_pass``) when the caller has it (``certified_radius``
    certifies the same points at many radii).
    """
    if bound not in ("local", "global"):
        raise ValueError(f"bound must be 'local' or 'global', got {bound!r}")
    if guarantee not in GUARANTEE_LEVELS:
        raise ValueError(f"guarantee must be one of {', '.join(GUARANTEE_LEVELS)}, got {guarantee!r}")
    check_input(model, x)
    check_radius_arg(eps, x)
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"labels of shape {tuple(getattr(y, 'shape', ()))} do not match a batch of {x.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            g = global_result or global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
            run = _Run(model, x, y, eps, g, last_layer, clean or clean_pass(model, x))
            if bound == "global":
                return run.result("exact", g.guarantee, "global")
            kw = dict(delta=delta, inflation=inflation, steps=steps, max_iter=max_iter, tol=tol,
                      generator=generator, work_dtype=work_dtype, method=method)
            if not cascade:
                return run.single_level(guarantee, kw)
            return run.cascade(guarantee, masked, screen_steps, kw)
    finally:
        model.train(was_training)


def warm_starts(model: nn.Module, g: GlobalBound, input_shape) -> List[Tensor]:
    """The layers' top singular vectors, the warm starts of the estimates from below: computed once
    per model and kept on its ``GlobalBound`` (the stages pass one to every batch)."""
    if g.vectors is None:
        g.vectors = top_singular_vectors(model, tuple(input_shape))
    return g.vectors


def screen_worst_margin(model: nn.Module, x: Tensor, pred: Tensor, eps: Tensor, m_global: Tensor, clean: CleanPass,
                        start_vectors: List[Tensor], *, steps: int = SCREEN_STEPS,
                        work_dtype: Optional[torch.dtype] = torch.float32, last_layer: str = "ball_box") -> Tensor:
    """[B] the screen's worst margin: masked norms estimated from below, combined with the global margins.

    Never below the worst margin of any sound step at the same radius (a sound norm is never
    below an estimate from below, and the margins are monotone in the norms), converged or
    not: a point it does not certify cannot be certified soundly.
    """
    screen = local_bound(model, x, eps, guarantee="estimate", method="krylov", steps=steps,
                         start_vectors=start_vectors, work_dtype=work_dtype, clean=clean, **_FROM_BELOW)
    return worst_margin(torch.maximum(local_margins(model, screen, pred, last_layer), m_global), pred)


class _Run:
    """The per-point state of one certification: margins so far and the deciding step."""

    def __init__(self, model, x, y, eps, g: GlobalBound, last_layer: str, clean: CleanPass):
        self.model, self.x, self.g, self.last_layer, self.clean = model, x, g, last_layer, clean
        self.eps = eps if isinstance(eps, Tensor) else torch.full((x.shape[0],), float(eps), dtype=x.dtype,
                                                                   device=x.device)
        self.logits = clean.logits
        self.pred = self.logits.argmax(dim=1)
        self.correct = self.pred == y
        self.m_global = global_margins(model, self.logits, clean.features, self.pred, g.lipschitz, self.eps)
        self.best = worst_margin(self.m_global, self.pred)
        self.robust = self.best > 0  # strictly: a tie is not certified
        self.step = torch.full_like(self.pred, STEP["not_certified"])
        self.step[self.robust] = STEP["global"]
        self.bound = g.lipschitz.to(x.dtype).expand(x.shape[0]).clone()
        self.converged = torch.ones_like(self.robust)
        self.iterations: List[int] = []
        self.info: dict = {}

    def open(self) -> Tensor:
        """Indices of the correct points no step has certified yet."""
        return (self.correct & ~self.robust).nonzero().squeeze(1)

    def apply(self, idx: Tensor, margins: Tensor, step_of: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """Record the margins [n, C] of points ``idx`` (a lower bound each); returns their worst margin."""
        m = torch.maximum(margins, self.m_global[idx])
        w = worst_margin(m, self.pred[idx])
        if valid is not None:  # estimates that did not converge decide nothing
            w = torch.where(valid, w, torch.full_like(w, -math.inf))
        ok = w > 0
        self.best[idx] = torch.maximum(self.best[idx], w)
        self.robust[idx[ok]] = True
        self.step[idx[ok]] = step_of[ok]
        return w

    def box(self) -> None:
        idx = self.open()
        self.info["box_points"] = int(idx.numel())
        if not idx.numel():
            return
        lb = box_bound(self.model, self.x[idx], self.eps[idx], global_norms=self.g.layer_norms,
                       clean=self.clean.select(idx))
        margins = local_margins(self.model, lb, self.pred[idx], self.last_layer)
        self.apply(idx, margins, torch.full_like(idx, STEP["box"]))

    def masked(self, idx: Tensor, level_kw: dict, step_of) -> None:
        lb = local_bound(self.model, self.x[idx], self.eps[idx], global_norms=self.g.layer_norms,
                         clean=self.clean.select(idx), **level_kw)
        margins = local_margins(self.model, lb, self.pred[idx], self.last_layer)
        valid = lb.converged if level_kw.get("guarantee") == "estimate" else None
        self.apply(idx, margins, step_of(lb), valid)
        self.bound[idx] = lb.lipschitz
        self.converged[idx] = lb.converged
        self.iterations = list(lb.iterations)
        self.info.setdefault("levels_info", []).append(lb.info)

    def cascade(self, guarantee: str, masked: bool, screen_steps: int, kw: dict) -> Certificate:
        self.box()
        idx = self.open()
        if masked and idx.numel():
            starts = warm_starts(self.model, self.g, tuple(self.x.shape[1:]))
            if guarantee == "estimate":
                est = dict(guarantee="estimate", method=kw["method"], max_iter=kw["max_iter"], tol=kw["tol"],
                           steps=kw["steps"], start_vectors=starts, work_dtype=kw["work_dtype"], **_FROM_BELOW)
                self.info["masked_points"] = int(idx.numel())
                self.masked(idx, est, lambda lb: torch.full_like(idx, STEP["estimate"]))
            else:
                self._screen_then_prove(idx, guarantee, screen_steps, starts, kw)
        self.step[~self.correct & ~self.robust] = STEP["misclassified"]
        text = cascade_guarantee(guarantee, delta=kw["delta"], tol=kw["tol"], max_iter=kw["max_iter"], masked=masked)
        return self.result(guarantee, text, "local")

    def _screen_then_prove(self, idx: Tensor, guarantee: str, screen_steps: int, starts, kw: dict) -> None:
        w = screen_worst_margin(self.model, self.x[idx], self.pred[idx], self.eps[idx], self.m_global[idx],
                                self.clean.select(idx), starts, steps=screen_steps, work_dtype=kw["work_dtype"],
                                last_layer=self.last_layer)
        # A sound bound is never below the estimate: a point the estimate fails cannot pass. The slack
        # only sends points at the edge (rounding) on to the sound computation.
        slack = 1e-6 * (1 + self.best[idx].abs())
        passed = w > -slack
        self.step[idx[~passed]] = STEP["excluded"]
        self.info.update(screened=int(idx.numel()), excluded=int((~passed).sum()))
        idx = idx[passed]
        self.info["masked_points"] = int(idx.numel())
        if not idx.numel():
            return
        sound = dict(guarantee="exact", exact_fallback="probabilistic" if guarantee == "probabilistic" else "global",
                     exact_near_global=NEAR_GLOBAL,
                     delta=kw["delta"], inflation=kw["inflation"], steps=kw["steps"], max_iter=kw["max_iter"],
                     tol=kw["tol"], generator=kw["generator"], work_dtype=kw["work_dtype"], start_vectors=starts)
        self.masked(idx, sound, lambda lb: torch.where(lb.deterministic, STEP["exact"], STEP["probabilistic"]))

    def single_level(self, guarantee: str, kw: dict) -> Certificate:
        """Today's local certificate: one level for every point, combined with the global margins."""
        idx = torch.arange(self.x.shape[0], device=self.x.device)
        level = dict(kw, guarantee=guarantee, init="random")
        level.pop("start_vectors", None)
        step = STEP[guarantee]
        self.masked(idx, level, lambda lb: torch.full_like(idx, step))
        self.step[self.robust & (worst_margin(self.m_global, self.pred) > 0)] = STEP["global"]
        self.step[~self.correct & ~self.robust] = STEP["misclassified"]
        info = (self.info.get("levels_info") or [{}])[0]
        text = local_guarantee(guarantee, tol=kw["tol"], max_iter=kw["max_iter"], method=kw["method"],
                               delta=kw["delta"], info=info)
        return self.result(guarantee, text, "local", info)

    def result(self, level: str, text: str, kind: str, info: Optional[dict] = None) -> Certificate:
        if kind == "global":
            self.step[~self.correct & ~self.robust] = STEP["misclassified"]
        deterministic = torch.zeros_like(self.robust)
        for name in DETERMINISTIC_STEPS:
            deterministic |= self.step == STEP[name]
        if info is None:
            info = dict(self.info)
            levels = info.pop("levels_info", [])
            if levels:
                info.update({k: v for k, v in levels[-1].items() if k != "level"})
        return Certificate(prediction=self.pred, correct=self.correct, robust=self.robust,
                           certified=self.robust & self.correct, worst_margin=self.best, bound=self.bound,
                           converged=self.converged, iterations=self.iterations, guarantee=text, kind=kind,
                           level=level, info=info, step=self.step, deterministic=deterministic & self.robust)
