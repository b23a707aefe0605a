"""What a bound rests on, as typed records (they cross from the solvers to the summaries and reports).

A record reads like the dict it replaced too (``record["proven"]``, ``record.get("steps")``), for
callers that only look at a field or two.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, List, Optional


class Record:
    """Dict-style read access to a dataclass's fields (``None`` fields read as absent)."""

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key, None) if key in self._names() else None
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None) if key in self._names() else None
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def _names(self):
        return {f.name for f in fields(self)}


@dataclass
class LayerRecord(Record):
    """What one hidden layer's masked norms rest on, for one batch."""

    side: Optional[str] = None  # the Gram matrix iterated on: "input" (A^T A) or "output" (A A^T)
    global_fallback: int = 0  # samples that took the layer's guaranteed global norm
    # exact level
    proven: Optional[int] = None  # samples with a Cholesky proof (zero operators included)
    near_global: Optional[int] = None  # samples within exact_near_global of the global norm (no proof needed)
    probabilistic: Optional[List["LayerRecord"]] = None  # the probabilistic fallback's records
    probabilistic_fallback: Optional[int] = None  # samples bounded by the probabilistic fallback
    # probabilistic level
    steps: Optional[int] = None  # Lanczos steps
    n_max: Optional[int] = None  # order of the largest Gram matrix
    inflation_max: Optional[float] = None
    inflation_median: Optional[float] = None
    fp_margin_max: Optional[float] = None


@dataclass
class NormRecord(Record):
    """What a local bound's layer norms rest on (``LocalBound.record``)."""

    level: str  # "probabilistic", "exact" or "estimate"
    delta: Optional[float] = None  # probabilistic: failure probability per sample
    delta_layer: Optional[float] = None  # its share per layer (union bound)
    layers: List[LayerRecord] = field(default_factory=list)
    masked_fraction: Optional[List[float]] = None  # estimate: share of the samples the masked solver ran for
    layer_norms: Optional[str] = None  # what the layer norms are when no solver ran (the box step)


@dataclass
class CascadeRecord(Record):
    """What a certification did (``Certificate.record``): the points each step tried, and what the masked
    norms rest on."""

    box_points: int = 0  # points the box step tried
    screened: int = 0  # points the screen tried
    excluded: int = 0  # points the screen excluded
    masked_points: int = 0  # points whose masked norms were bounded soundly (or estimated)
    norms: Optional[NormRecord] = None  # the masked norms' record (None: no masked norms computed)
    steps: dict = field(default_factory=dict)  # points tried by steps registered beyond the built-in ones
