"""Training losses built from margin lower bounds.

All robust losses take ``margins`` [B, C]: lower bounds of z_y - z_j over the
eps-ball (column y is 0), from either the local or the global bound.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

from .bounds import bottom_logit, worst_case_logits

Tensor = torch.Tensor


def bcp_mix_loss(logits: Tensor, margins: Tensor, y: Tensor, kappa: float) -> Tensor:
    """kappa * CE(z, y) + (1 - kappa) * CE(worst-case logits, y) (BCP / Local-Lip)."""
    robust = F.cross_entropy(worst_case_logits(logits, margins, y), y)
    if kappa <= 0:
        return robust
    return kappa * F.cross_entropy(logits, y) + (1 - kappa) * robust


def gloro_loss(logits: Tensor, margins: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy over [z, z_bot] (GloRo): pushes the ⊥ logit below z_y."""
    return F.cross_entropy(bottom_logit(logits, margins, y), y)


def gloro_trades_loss(logits: Tensor, margins: Tensor, y: Tensor, lam: float) -> Tensor:
    """GloRo's TRADES variant: CE(z, y) + lam * KL(p_clean || p_gloro).

    p_clean is softmax(z) with zero mass on ⊥; p_gloro is softmax([z, z_bot]).
    """
    clean = F.cross_entropy(logits, y)
    log_p = F.log_softmax(logits, dim=1)
    log_q = F.log_softmax(bottom_logit(logits, margins, y), dim=1)[:, :-1]
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return clean + lam * kl


def sparsity_loss(pre_bounds: List[Tuple[Tensor, Tensor]], acts: list) -> Tensor:
    """Mean over clipped-activation layers of each neuron's distance to a fixed region.

    Pushing neurons into their fixed regions (off, or saturated at theta) on the
    ball removes them from the local bound and makes it tighter.
    """
    terms = []
    for (lb, ub), act in zip(pre_bounds, acts):
        if getattr(act, "has_thresholds", False):
            d = act.fixed_distance(lb, ub)
            if d is not None:
                terms.append(d.mean())
    if not terms:
        return torch.zeros((), device=pre_bounds[0][0].device if pre_bounds else "cpu")
    return torch.stack(terms).mean()
