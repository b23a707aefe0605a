"""The common part of the layers that hold a weight tensor (``nn.Linear``, ``nn.Conv2d``).

A leading ``Normalize`` is folded in: its 1/std scales the input columns of W (the
operator the bounds see) and its shift only moves the bias; a preceding ``Flatten`` is
applied inside ``forward``. So the bounds of a normalized model are in input units.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ...nn.models import Normalize
from .base import AffineLayer

Tensor = torch.Tensor


class WeightedLayer(AffineLayer):
    """An affine layer made of one module with a ``weight`` (and an optional folded ``Normalize``)."""

    def __init__(self, layer: nn.Module, in_shape: Sequence[int], norm: Optional[Normalize] = None,
                 flatten: bool = False):
        self.layer = self.owner = layer
        self.in_shape = tuple(in_shape)
        self.norm = norm
        self.flatten = flatten
        self._weight: Optional[Tensor] = None  # set by cast(): the same operator in another dtype
        self._std: Optional[Tensor] = None

    @property
    def weight(self) -> Tensor:
        return self.layer.weight if self._weight is None else self._weight

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def weights_key(self) -> tuple:
        w = self.layer.weight
        key = (id(self.layer), w.data_ptr(), w._version)
        if self.norm is not None:
            key += (self.norm.std.data_ptr(), self.norm.std._version)
        return key

    def cast(self, dtype: torch.dtype) -> "WeightedLayer":
        """The same linear operator with detached weights in ``dtype`` (for cheap iterations)."""
        op = type(self).__new__(type(self))
        op.__dict__.update(self.__dict__)
        op._weight = self.layer.weight.detach().to(dtype)
        op._std = None if self.norm is None else self.norm.std.to(dtype)
        return op

    def _scale(self, v: Tensor, power: int = 1) -> Tensor:
        if self.norm is None:
            return v
        std = self.norm.std if self._std is None else self._std
        return v / std ** power

    def _apply(self, v: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, h: Tensor) -> Tensor:
        """z = W h + b, exactly as the model computes it."""
        if self.norm is not None:
            h = self.norm(h)
        if self.flatten:
            h = h.flatten(1)
        return self.layer(h)

    def linear(self, v: Tensor) -> Tensor:
        """W v (no bias)."""
        return self._apply(self._scale(v), self.weight)

    def abs_linear(self, v: Tensor) -> Tensor:
        """|W| v, for interval radii."""
        return self._apply(self._scale(v), self.weight.abs())

    def row_norms(self, col_mask: Optional[Tensor] = None) -> Tensor:
        """||row_k(W diag(col_mask))||_2 for every output neuron k (exact at padded borders)."""
        if col_mask is None:
            col_mask = torch.ones((1,) + self.in_shape, dtype=self.weight.dtype, device=self.weight.device)
        # col_mask squared: a 0/1 mask is unchanged, and a composed layer passes the row norms of the
        # layer before it as weights (layers/composed.py).
        sq = self._apply(self._scale(col_mask.square(), power=2), self.weight.square())
        # Clamping away from 0 only enlarges the norm (sound) and keeps sqrt differentiable.
        return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
