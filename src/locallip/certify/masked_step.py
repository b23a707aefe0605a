"""The cascade's masked step: a screen from below, then masked layer norms proven for what is left.

The screen estimates the masked norms *from below* (a few Lanczos steps warm-started at the
layers' top singular vectors). A sound bound is never below such an estimate, and every
quantity downstream is monotone in the norms, so a point the screen fails cannot pass with
any sound value: it is ``excluded``. The rest get their masked norms proven ``exact``ly where
the budget allows, and the ``probabilistic`` bound (inflated Lanczos) otherwise.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..bounds import local_bound, local_margins, worst_margin
from ..bounds.clean import CleanPass
from ..bounds.settings import NormSettings
from .settings import SCREEN_STEPS
from .steps import STEP

Tensor = torch.Tensor

#: Masked step: a layer whose masked norm is within this fraction of its global norm (by an
#: estimate from below) takes the global norm, without a proof (it loses at most this much).
NEAR_GLOBAL = 1e-3
#: Estimates from below (screen, estimate step): a layer whose warm-start Rayleigh quotient is within
#: this fraction of the layer's norm takes that quotient and skips the Lanczos steps.
WARM_ENOUGH = 1e-4
FROM_BELOW = dict(init="global", masked_norms="adaptive", adaptive_tol=WARM_ENOUGH, adaptive_from_below=True)


def screen_worst_margin(model, x: Tensor, pred: Tensor, eps: Tensor, m_global: Tensor, clean: CleanPass,
                        start_vectors: List[Tensor], *, steps: int = SCREEN_STEPS,
                        work_dtype: Optional[torch.dtype] = torch.float32, last_layer: str = "ball_box") -> Tensor:
    """[B] the screen's worst margin: masked norms estimated from below, combined with the global margins.

    Never below the worst margin of any sound step at the same radius (a sound norm is never
    below an estimate from below, and the margins are monotone in the norms), converged or
    not: a point it does not certify cannot be certified soundly.
    """
    settings = NormSettings(level="estimate", method="krylov", steps=steps, work_dtype=work_dtype, **FROM_BELOW)
    screen = local_bound(model, x, eps, settings, start_vectors=start_vectors, clean=clean)
    return worst_margin(torch.maximum(local_margins(model, screen, pred, last_layer), m_global), pred)


def apply_local_bound(state, idx: Tensor, norms: NormSettings, start_vectors, step_of) -> None:
    """The local bound of points ``idx`` with ``norms``; their margins recorded, ``step_of(lb)`` their step."""
    lb = local_bound(state.model, state.x[idx], state.eps[idx], norms, generator=state.generator,
                     global_norms=state.g.layer_norms, start_vectors=start_vectors, clean=state.clean.select(idx))
    margins = local_margins(state.model, lb, state.pred[idx], state.settings.last_layer)
    valid = lb.converged if norms.level == "estimate" else None
    state.apply(idx, margins, step_of(lb), valid)
    state.bound[idx] = lb.lipschitz
    state.converged[idx] = lb.converged
    state.iterations = list(lb.iterations)
    state.record.norms = lb.record


def screen_then_prove(state, idx: Tensor, s, starts) -> None:
    """Exclude what the screen fails; prove masked norms (exact, else probabilistic or global) for the rest."""
    w = screen_worst_margin(state.model, state.x[idx], state.pred[idx], state.eps[idx], state.m_global[idx],
                            state.clean.select(idx), starts, steps=s.screen_steps, work_dtype=s.work_dtype,
                            last_layer=s.last_layer)
    # A sound bound is never below the estimate: a point the estimate fails cannot pass. The slack
    # only sends points at the edge (rounding) on to the sound computation.
    slack = 1e-6 * (1 + state.best[idx].abs())
    passed = w > -slack
    state.step[idx[~passed]] = STEP["excluded"]
    state.record.screened, state.record.excluded = int(idx.numel()), int((~passed).sum())
    idx = idx[passed]
    state.record.masked_points = int(idx.numel())
    if not idx.numel():
        return
    sound = s.norms(level="exact", exact_fallback="probabilistic" if s.level == "probabilistic" else "global",
                    exact_near_global=NEAR_GLOBAL, method="lanczos")
    apply_local_bound(state, idx, sound, starts,
                      lambda lb: torch.where(lb.deterministic, STEP["exact"], STEP["probabilistic"]))
