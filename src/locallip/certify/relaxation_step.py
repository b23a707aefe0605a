"""The cascade's last step: a linear relaxation (CROWN) of the network over the ball.

It runs on the correct points every Lipschitz step left undecided, the points the screen
excluded included: the screen only proves that no *Lipschitz* bound certifies them, and a
linear relaxation is not one. Its margins are sound in floating point and deterministic
(``bounds.linear_relaxation``), so its certificates count as deterministic. It relaxes ReLU,
clipped ReLU, MaxMin and clipped MaxMin; networks with another activation skip it, and the
record says so. It costs about 0.1 s a point on a small CNN (one thread; 0.2-0.5 s on the
showcase 2C2F clipped-MaxMin model, where it certifies nothing more), far more than the
Lipschitz steps, so it is a setting: ``CascadeSettings.linear_relaxation``.
"""
from __future__ import annotations

import torch

from ..bounds import box_bound
from ..bounds.linear_relaxation import LinearRelaxation, RelaxationNotApplicable, linear_relaxation_margins
from .steps import STEP


def pays_by_default(model) -> bool:
    """What ``linear_relaxation: auto`` means in certify-model: on, except for networks with clipped
    (thresholded) activations, the models trained here for a local bound. On the showcase model the step
    certified no point more, at 28-58x the certification time (``bench/relaxation_cost.py``); on ordinary
    ReLU networks it certifies up to twice what the Lipschitz steps do (``bench/certify_external.py``)."""
    return not any(getattr(m, "has_thresholds", False) for m in model.modules())


def relaxation_of(state):
    """The model's ``LinearRelaxation`` (a float64 copy with its rows cached), kept on its ``GlobalBound``
    like the warm starts, so every batch of a split reuses it; None where it does not apply."""
    g = state.g
    cached = g.cache.get("linear_relaxation")
    if cached is None:
        try:
            cached = LinearRelaxation(state.model, tuple(state.x.shape[1:]))
        except RelaxationNotApplicable as e:
            cached = str(e)
        g.cache["linear_relaxation"] = cached
    return cached if isinstance(cached, LinearRelaxation) else None


def run_linear_relaxation_step(state, s) -> None:
    """Linear-relaxation margins for the correct points no step certified (excluded ones included)."""
    if not s.linear_relaxation:
        return
    idx = (state.correct & ~state.robust).nonzero().squeeze(1)
    record = state.record.steps
    record["linear_relaxation"] = 0
    if not idx.numel():
        return
    net = relaxation_of(state)
    if net is None:
        record["linear_relaxation_not_applicable"] = str(state.g.cache["linear_relaxation"])
        return
    record["linear_relaxation"] = int(idx.numel())
    # Its starting boxes: IBP ∩ ball on the guaranteed global norms (the box step's), then tightened.
    start = box_bound(state.model, state.x[idx], state.eps[idx], global_norms=state.g.layer_norms,
                      clean=state.clean.select(idx))
    margins = linear_relaxation_margins(state.model, state.x[idx], state.pred[idx], state.eps[idx],
                                        pre_bounds=start.pre_bounds, network=net)
    state.apply(idx, margins.to(state.best.dtype), torch.full_like(idx, STEP["linear_relaxation"]))
