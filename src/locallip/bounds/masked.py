"""Masked operators: A = diag(row_mask) W diag(col_mask) applied through a layer's own products.

A mask removes the rows of fixed outputs and the columns of fixed inputs (0/1, per sample);
None means all ones. The norm solvers (power iteration, Lanczos, the exact proofs) only use these.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layers.base import AffineLayer, batch_norm2

Tensor = torch.Tensor

_batch_norm = batch_norm2


def _normalize(v: Tensor) -> Tensor:
    n = _batch_norm(v)
    # No epsilon added to the norm: a zero vector stays zero instead of shrinking others.
    return v / torch.where(n > 0, n, torch.ones_like(n)).view(-1, *([1] * (v.dim() - 1)))


def _in_dtype(dtype: Optional[torch.dtype], op: AffineLayer, v0: Tensor, col_mask: Optional[Tensor],
              row_mask: Optional[Tensor]):
    """The operator, start vector and masks in ``dtype`` (unchanged when None or already so)."""
    if dtype is None or dtype == op.dtype:
        return op, v0, col_mask, row_mask
    return (op.cast(dtype), v0.to(dtype), None if col_mask is None else col_mask.to(dtype),
            None if row_mask is None else row_mask.to(dtype))


def masked_linear(op: AffineLayer, v: Tensor, col_mask: Optional[Tensor], row_mask: Optional[Tensor]) -> Tensor:
    """A v with A = diag(row_mask) W diag(col_mask) (None = all ones)."""
    out = op.linear(v if col_mask is None else v * col_mask)
    return out if row_mask is None else out * row_mask


def masked_transpose(op: AffineLayer, u: Tensor, col_mask: Optional[Tensor]) -> Tensor:
    """A^T u for u = A v (already zero outside the row mask, so the row mask is not applied again)."""
    out = op.transpose(u)
    return out if col_mask is None else out * col_mask


# The solvers' names for the two masked products.
_masked_linear, _masked_transpose = masked_linear, masked_transpose
