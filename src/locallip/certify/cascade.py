"""``certify``: per point, at one radius, the cheapest sound certificate that decides it.

A point is certified at radius eps when its prediction is the label and a lower
bound of every margin z_pred - z_j over the whole ball is strictly positive.
Ties (margin 0) and misclassified points are never certified.

The local certificate is a cascade; each point stops at the first step that decides it
(the steps are records of ``certify.steps``; these are the built-in ones):

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
certifies a superset of the global and box steps. ``level`` is the weakest guarantee
allowed: "probabilistic" (default) lets step 3 fall back to the probabilistic bound,
"exact" falls back to the global norm instead (deterministic everywhere), "estimate"
replaces step 3 by the estimate itself (the references' level, labelled as such).
``cascade=False`` computes one level for every point (no shortcut).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from ..bounds import GlobalBound, box_bound, global_bound, local_margins, top_singular_vectors, worst_margin
from ..bounds.clean import CleanPass, check_finite_weights, check_input, clean_pass
from ..bounds.records import CascadeRecord
from ..bounds.settings import as_batch_radius, settings_from
from . import masked_step
from .relaxation_step import run_linear_relaxation_step
from .guarantees import cascade_guarantee, local_guarantee
from .settings import SCREEN_STEPS, CascadeSettings
from .state import CascadeState
from .steps import CERTIFYING_STEPS, DETERMINISTIC_STEPS, STEP, STEPS, Step, register_step, running_order

Tensor = torch.Tensor

__all__ = ["CERTIFYING_STEPS", "DETERMINISTIC_STEPS", "SCREEN_STEPS", "STEP", "STEPS", "CascadeSettings",
           "Certificate", "certify", "screen_worst_margin", "warm_starts"]

screen_worst_margin = masked_step.screen_worst_margin


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
    promise: str  # what the certificate promises, in words
    kind: str  # "local" | "global"
    level: str = "exact"  # "probabilistic" | "exact" | "estimate" (global certificates are exact)
    record: CascadeRecord = field(default_factory=CascadeRecord)  # points per step, what the norms rest on
    step: Optional[Tensor] = None  # [B] index into the step registry: the step that decided the point
    deterministic: Optional[Tensor] = None  # [B] the point's certificate rests on no random start

    @property
    def guarantee(self) -> str:
        """The older name of ``promise``."""
        return self.promise

    @property
    def info(self) -> CascadeRecord:
        """The older name of ``record``."""
        return self.record

    def step_names(self) -> List[str]:
        return [STEPS[int(s)] for s in self.step]

    def step_counts(self) -> Dict[str, int]:
        """Certified points per certifying step."""
        cert = self.step[self.certified]
        return {name: int((cert == STEP[name]).sum()) for name in CERTIFYING_STEPS}


def warm_starts(model: nn.Module, g: GlobalBound, input_shape) -> List[Tensor]:
    """The layers' top singular vectors, the warm starts of the estimates from below: computed once
    per model and kept on its ``GlobalBound`` (the stages pass one to every batch)."""
    if g.vectors is None:
        g.vectors = top_singular_vectors(model, tuple(input_shape))
    return g.vectors


def certify(model: nn.Module, x: Tensor, y: Tensor, eps: Union[float, Tensor], bound: str = "local",
            settings: Optional[CascadeSettings] = None, *, generator: Optional[torch.Generator] = None,
            global_result: Optional[GlobalBound] = None, clean: Optional[CleanPass] = None,
            **options) -> Certificate:
    """Certify each (x_b, y_b) at l2 radius ``eps`` with the local (cascade) or the global bound.

    ``settings`` (a ``CascadeSettings``, or keyword overrides of its fields; ``guarantee=`` is
    the older name of ``level``) say how. The global bound is the guaranteed upper bound (exact
    SVD / FFT); ``global_result`` reuses one, and is refused for any other model or weights.
    The local certificate is the cascade of the module docstring (``masked=False`` stops it
    after the box step); ``cascade=False`` computes ``bounds.local_bound`` at ``level`` for
    every point and combines its margins with the global ones. Works for any plain Sequential
    of supported layers (the input shape comes from ``x``); norms and margins are computed in
    the model's dtype (float32 or float64; float64 recommended), iterations in ``work_dtype``.
    ``clean`` is x's clean forward pass (``bounds.clean_pass``) when the caller has it
    (``certified_radius`` certifies the same points at many radii).
    """
    s = settings_from(settings, CascadeSettings, options)
    if bound not in ("local", "global"):
        raise ValueError(f"bound must be 'local' or 'global', got {bound!r}")
    check_input(model, x)
    check_finite_weights(model)
    eps_b = as_batch_radius(eps, x)
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"labels of shape {tuple(getattr(y, 'shape', ()))} do not match a batch of {x.shape[0]}")
    if global_result is not None:
        global_result.check_model(model, tuple(x.shape[1:]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            g = global_result or global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
            state = CascadeState(model, x, y, eps_b, g, s, clean or clean_pass(model, x), generator)
            if bound == "global":
                return _result(state, "exact", g.guarantee, "global")
            if not s.cascade:
                return _single_level(state, s)
            for step in running_order():
                if step.runs_with(s):
                    step.run(state, s)
            state.step[~state.correct & ~state.robust] = STEP["misclassified"]
            return _result(state, s.level, cascade_guarantee(s), "local")
    finally:
        model.train(was_training)


def run_box_step(state: CascadeState, s: CascadeSettings) -> None:
    """The local bound's boxes on the guaranteed global norms, for the open points."""
    idx = state.open()
    state.record.box_points = int(idx.numel())
    if not idx.numel():
        return
    lb = box_bound(state.model, state.x[idx], state.eps[idx], global_norms=state.g.layer_norms,
                   clean=state.clean.select(idx))
    margins = local_margins(state.model, lb, state.pred[idx], s.last_layer)
    state.apply(idx, margins, torch.full_like(idx, STEP["box"]))


def run_masked_step(state: CascadeState, s: CascadeSettings) -> None:
    """Masked layer norms for the open points: the screen, then the sound proofs (or the estimate)."""
    idx = state.open()
    if not s.masked or not idx.numel():
        return
    starts = warm_starts(state.model, state.g, tuple(state.x.shape[1:]))
    if s.level == "estimate":
        state.record.masked_points = int(idx.numel())
        masked_step.apply_local_bound(state, idx, s.norms(**masked_step.FROM_BELOW),
                                      starts, lambda lb: torch.full_like(idx, STEP["estimate"]))
    else:
        masked_step.screen_then_prove(state, idx, s, starts)


def _single_level(state: CascadeState, s: CascadeSettings) -> Certificate:
    """One level for every point (no shortcut), combined with the global margins."""
    idx = torch.arange(state.x.shape[0], device=state.x.device)
    step = STEP[s.level]
    masked_step.apply_local_bound(state, idx, s.norms(init="random"), None, lambda lb: torch.full_like(idx, step))
    state.step[state.robust & (worst_margin(state.m_global, state.pred) > 0)] = STEP["global"]
    state.step[~state.correct & ~state.robust] = STEP["misclassified"]
    text = local_guarantee(s.level, tol=s.tol, max_iter=s.max_iter, method=s.method, delta=s.delta,
                           info=state.record.norms)
    return _result(state, s.level, text, "local")


def _result(state: CascadeState, level: str, text: str, kind: str) -> Certificate:
    if kind == "global":
        state.step[~state.correct & ~state.robust] = STEP["misclassified"]
    return Certificate(prediction=state.pred, correct=state.correct, robust=state.robust,
                       certified=state.robust & state.correct, worst_margin=state.best, bound=state.bound,
                       converged=state.converged, iterations=state.iterations, promise=text, kind=kind,
                       level=level, record=state.record, step=state.step, deterministic=state.deterministic())


# The built-in steps, in index order (indices are part of certificates: append, never reorder).
for _step in (
    Step("global", True, "deterministic", "global margins", "the global (GloRo) margins"),
    Step("box", True, "deterministic", "boxes on global norms",
         "the boxes of the local bound built on the guaranteed global layer norms", run=run_box_step),
    # The masked step runs once and decides exact, probabilistic or estimate per point.
    Step("exact", True, "deterministic", "masked norms, exact", "masked layer norms", run=run_masked_step),
    Step("probabilistic", True, "probabilistic", "masked norms, probabilistic"),
    Step("estimate", True, "estimate", "masked norms, estimate"),
    Step("misclassified", False),
    Step("excluded", False),
    Step("not_certified", False),
    Step("linear_relaxation", True, "deterministic", "linear relaxation",
         "a linear relaxation (CROWN) of the network over the ball for the points still undecided, those the "
         "screen excluded included", run=run_linear_relaxation_step, enabled=lambda s: s.linear_relaxation),
):
    register_step(_step)
