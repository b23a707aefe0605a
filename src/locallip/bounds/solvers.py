"""What a per-layer norm solver returns, and the shape of a solver (shared by every guarantee level)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .layers.base import AffineLayer

Tensor = torch.Tensor


@dataclass
class LayerNorms:
    """What a per-layer solver returns for a batch: the norms and what they are."""

    sigma: Tensor  # [B] the value used for ||diag(row) W diag(col)||
    work: int  # steps / iterations / operator applications (max over the batch)
    converged: Tensor  # [B] bool (estimates); True for bounds
    deterministic: Tensor  # [B] bool: a deterministic upper bound


#: ``solve(l, op, col_mask, row_mask, v0) -> LayerNorms`` for hidden layer l.
Solver = Callable[[int, AffineLayer, Optional[Tensor], Tensor, Tensor], LayerNorms]
