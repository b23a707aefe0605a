"""How the masked layer norms of the local bound are computed: one frozen settings object.

Every default is written here once. ``local_bound`` takes a ``NormSettings`` (or keyword
overrides of its fields); the certification cascade and the training step build theirs
from the typed configuration and pass it whole.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Union

import torch

from ..foundation.radius import check_radius

Tensor = torch.Tensor

#: What a masked layer norm is: an upper bound with probability >= 1 - delta, a deterministic
#: upper bound, or an estimate from below (no guarantee).
LEVELS = ("probabilistic", "exact", "estimate")
#: Training: when to run the masked solver for a layer (see ``NormSettings.masked_norms``).
MASKED_NORMS = ("always", "adaptive", "never")
METHODS = ("power", "lanczos", "krylov")

#: Largest explicit operator (entries) built for one layer: 2.5e7 float64 = 200 MB.
DEFAULT_MAX_ENTRIES = 25_000_000
#: Largest per-sample factorisation cost n * (w + 1)^2 (about 0.1 s on one core).
DEFAULT_MAX_FLOPS = 2_000_000_000


@dataclass(frozen=True)
class NormSettings:
    """How ``local_bound`` computes each masked layer norm (see its docstring for the levels)."""

    level: str = "probabilistic"  # one of LEVELS
    delta: float = 1e-9  # probabilistic: failure probability per sample (union over the layers)
    inflation: float = 0.01  # probabilistic: steps chosen so the norm inflation is at most this
    steps: Optional[int] = None  # probabilistic / krylov: Lanczos steps (None: from inflation / max_iter)
    method: str = "lanczos"  # estimate: "lanczos", "power" or "krylov"
    max_iter: int = 2000  # operator applications per layer (estimate and the exact level's estimate)
    tol: float = 1e-4  # relative residual at which an estimate has converged
    init: str = "random"  # "random" or "global" (warm start: estimates only)
    work_dtype: Optional[torch.dtype] = torch.float32  # dtype of the iterations (None: the model's)
    exact_max_entries: int = DEFAULT_MAX_ENTRIES
    exact_max_flops: int = DEFAULT_MAX_FLOPS
    exact_fallback: str = "global"  # exact: over budget or unproven -> "global" norm or "probabilistic"
    exact_near_global: float = 0.0  # exact: within this fraction of the global norm -> the global norm
    masked_norms: str = "always"  # training: "always", "adaptive" or "never"
    adaptive_tol: float = 0.01  # adaptive: masks that change the norm by less keep the global norm
    adaptive_from_below: bool = False  # adaptive: ||D W D' v|| / ||D' v|| instead of the global norm

    def __post_init__(self):
        check_norm_settings(self)

    def with_options(self, **options) -> "NormSettings":
        """A copy with some fields replaced (``guarantee=`` is the older name of ``level``)."""
        return replace(self, **_renamed(options, type(self)))


def _renamed(options: dict, cls) -> dict:
    options = dict(options)
    if "guarantee" in options:  # the keyword's older name
        if "level" in options:
            raise TypeError("give level= or its older name guarantee=, not both")
        options["level"] = options.pop("guarantee")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; {cls.__name__} has {', '.join(sorted(known))}")
    return options


def settings_from(settings, cls, options: dict):
    """``settings`` (or the defaults of ``cls``) with keyword ``options`` applied."""
    base = cls() if settings is None else settings
    if not isinstance(base, cls):
        raise TypeError(f"settings must be a {cls.__name__}, got {type(base).__name__}")
    return replace(base, **_renamed(options, cls)) if options else base


def check_norm_settings(s: NormSettings) -> None:
    if s.level not in LEVELS:
        raise ValueError(f"guarantee must be one of {', '.join(LEVELS)}, got {s.level!r}")
    if s.method not in METHODS:
        raise ValueError(f"method must be 'power', 'lanczos' or 'krylov', got {s.method!r}")
    if s.init not in ("global", "random"):
        raise ValueError("init must be 'global' or 'random'")
    if s.level != "estimate" and s.init != "random":
        raise ValueError(f"the {s.level} guarantee needs init='random' (a start independent of the model)")
    if s.masked_norms not in MASKED_NORMS:
        raise ValueError(f"masked_norms must be one of {', '.join(MASKED_NORMS)}, got {s.masked_norms!r}")
    if s.masked_norms != "always" and (s.level != "estimate" or s.init != "global"):
        raise ValueError("masked_norms other than 'always' is a training option: it needs guarantee='estimate' "
                         "and init='global'")
    if s.exact_fallback not in ("global", "probabilistic"):
        raise ValueError(f"exact_fallback must be 'global' or 'probabilistic', got {s.exact_fallback!r}")
    if (s.level == "probabilistic" or s.exact_fallback == "probabilistic") and not 0 < s.delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {s.delta!r}")


def as_batch_radius(eps: Union[float, Tensor], x: Tensor) -> Tensor:
    """The one radius check: ``eps`` (a number, or one per sample) as a [B] tensor like ``x``.

    A radius is a finite number >= 0 (``foundation.ranges.check_radius``, which the
    configuration and the command line use too).
    """
    if isinstance(eps, Tensor):
        if eps.dim() == 0:
            eps = eps.expand(x.shape[0])
        if eps.shape != (x.shape[0],):
            raise ValueError(f"eps must be a scalar or one value per sample, got shape {tuple(eps.shape)}")
        if not bool(torch.isfinite(eps).all()) or bool((eps < 0).any()):
            raise ValueError("eps must be finite and >= 0")
        return eps.to(dtype=x.dtype, device=x.device)
    check_radius(eps, "eps (a number, or a tensor of one per sample)")
    return torch.as_tensor(eps, dtype=x.dtype, device=x.device).expand(x.shape[0])
