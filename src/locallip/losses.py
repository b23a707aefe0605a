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


def emma_loss(logits: Tensor, margins: Tensor, y: Tensor) -> Tensor:
    """EMMA (Hu et al. 2023, LiResNet's ``emma_loss``): CE over logits where each other class j gains only
    part of what the bound lets it gain, its own share t_j of the bound.

    With d_j = z_y - z_j the clean margin and g_j = d_j - m_j >= 0 what the bound takes off it (eps K_yj
    for the global bound), class j's logit relative to z_y is -d_j + t_j g_j, with
    t_j = clip(d_j / g_j, 0.01, 1) held constant (no gradient): the radius at which j would catch up,
    as a fraction of eps. Where every t_j = 1 this is CE of the worst-case logits; where the bound
    takes nothing (g = 0) it is CE(z, y).
    """
    clean = logits - logits.gather(1, y[:, None])  # z_j - z_y = -d_j
    gap = -clean - margins
    share = (-clean / gap.clamp_min(1e-8)).clamp(0.01, 1.0).detach()
    # The label's own column is exactly 0 (the reference's K_yy = 0), whatever column y of margins holds.
    emma = (clean + share * gap).masked_fill(F.one_hot(y, logits.shape[1]).bool(), 0.0)
    return F.cross_entropy(emma, y)


def trades_kl_loss(logits: Tensor, margins_pred: Tensor, y: Tensor, lam: float) -> Tensor:
    """The GloRo reference's ``sparse_trades_kl.lam`` (klasleino/gloro, ``training/losses.py``):
    CE(z, y) + lam * KL(p || q) with p = [softmax(z), 0] and q = softmax([z, z_bot]).

    As in the reference, the ⊥ logit is taken at the *predicted* class: ``margins_pred`` are the
    margin lower bounds of z_pred - z_j (pred = argmax z), and both distributions are clipped to
    [1e-7, 1] before the KL, as Keras' ``KLDivergence`` does (so the ⊥ column counts with 1e-7).
    """
    pred = logits.argmax(1)
    clean = F.cross_entropy(logits, y)
    p = F.pad(F.softmax(logits, dim=1), (0, 1)).clamp(1e-7, 1.0)
    q = F.softmax(bottom_logit(logits, margins_pred, pred), dim=1).clamp(1e-7, 1.0)
    kl = (p * (p.log() - q.log())).sum(dim=1).mean()
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
