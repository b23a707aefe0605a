"""How ``certify`` and ``certified_radius`` certify: one frozen settings object, every default once.

The certify stage builds it from the typed configuration (``from_config``) and passes it
whole; the library functions also take keyword overrides of its fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..bounds.settings import LEVELS, NormSettings

#: Default Lanczos steps of the screen (estimates from below; more steps exclude more points).
SCREEN_STEPS = 8
LAST_LAYERS = ("ball", "ball_box")


@dataclass(frozen=True)
class CascadeSettings:
    """What a local certificate rests on and how it is computed (see ``certify``)."""

    level: str = "probabilistic"  # the weakest guarantee allowed: probabilistic, exact or estimate
    cascade: bool = True  # each point stops at the cheapest step that decides it (False: one level for all)
    masked: bool = True  # the cascade tries masked layer norms on the points global and box leave open
    screen_steps: int = SCREEN_STEPS  # Lanczos steps of the from-below estimate that excludes points
    delta: float = 1e-9  # probabilistic: failure probability per certified point
    inflation: float = 0.01  # probabilistic: steps chosen so the norm inflation is at most this
    steps: Optional[int] = None  # probabilistic: Lanczos steps per layer (None: from inflation)
    max_iter: int = 2000  # estimate / exact: operator applications per layer
    tol: float = 1e-4  # estimate / exact: relative residual at which an estimate has converged
    last_layer: str = "ball_box"  # the last layer's worst case: ball, or ball ∩ box (BCP)
    work_dtype: Optional[torch.dtype] = torch.float32  # dtype of the iterations (None: the model's)
    method: str = "lanczos"  # estimate: how the masked layer norms are estimated
    # The cascade's last step: a linear relaxation (CROWN) for the correct points still undecided.
    linear_relaxation: bool = False

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"guarantee must be one of {', '.join(LEVELS)}, got {self.level!r}")
        if self.last_layer not in LAST_LAYERS:
            raise ValueError(f"unknown last-layer mode {self.last_layer!r}")

    def norms(self, **changes) -> NormSettings:
        """The ``NormSettings`` of the masked-norm computations these settings imply (plus ``changes``)."""
        base = dict(level=self.level, delta=self.delta, inflation=self.inflation, steps=self.steps,
                    max_iter=self.max_iter, tol=self.tol, work_dtype=self.work_dtype, method=self.method)
        base.update(changes)
        return NormSettings(**base)


def from_config(cfg, level: Optional[str] = None) -> CascadeSettings:
    """The settings of the local certificate at ``level`` (default: the configured one) from the
    certify configuration (``foundation.schema.CertifySettings``). ``linear_relaxation`` "auto" counts
    as off here: the stages resolve it first (``foundation.compose.with_linear_relaxation``)."""
    return CascadeSettings(level=str(level or cfg.guarantee), cascade=bool(cfg.cascade), masked=bool(cfg.masked_step),
                           screen_steps=cfg.screen_steps, delta=cfg.delta, inflation=cfg.inflation, steps=cfg.steps,
                           max_iter=cfg.max_iter, tol=cfg.tol, last_layer=str(cfg.last_layer), method=str(cfg.method),
                           linear_relaxation=str(getattr(cfg, "linear_relaxation", "off")) == "on")

