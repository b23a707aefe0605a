"""The per-point state of one certification: the margins found so far and the step that decided."""
from __future__ import annotations

import math
from typing import List, Optional

import torch

from ..bounds import GlobalBound, global_margins, worst_margin
from ..bounds.clean import CleanPass
from ..bounds.records import CascadeRecord
from .steps import STEP, certifying_steps

Tensor = torch.Tensor


class CascadeState:
    """What a step of the cascade reads (the batch, the clean pass, the global bound) and updates.

    Made by the global step: GloRo's margins with the guaranteed global bound decide first.
    A later step certifies among ``open()`` and records what it found with ``apply``; what each
    step rests on goes into ``record`` (points it tried, what its bounds rest on).
    """

    def __init__(self, model, x: Tensor, y: Tensor, eps: Tensor, g: GlobalBound, settings, clean: CleanPass,
                 generator: Optional[torch.Generator] = None):
        self.model, self.x, self.g, self.settings, self.clean = model, x, g, settings, clean
        self.generator = generator
        self.eps = eps
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
        self.record = CascadeRecord()

    def open(self) -> Tensor:
        """Indices of the correct points no step has certified yet (and no step has excluded)."""
        return (self.correct & ~self.robust & (self.step != STEP["excluded"])).nonzero().squeeze(1)

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

    def deterministic(self) -> Tensor:
        """[B] the point is certified by a step whose certificates rest on no random start."""
        out = torch.zeros_like(self.robust)
        for s in certifying_steps():
            if s.guarantee == "deterministic":
                out |= self.step == STEP[s.name]
        return out & self.robust
