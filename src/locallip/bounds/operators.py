"""Layers as linear operators on per-sample tensors (the layer protocol's objects, ``bounds.layers``),
and the split of a network into them.

Notation: h_0 = x, z_l = W_l h_{l-1} + b_l, h_l = act_l(z_l) for l < L, logits z_L.
Their masked forms A = diag(row_mask) W diag(col_mask) are in ``bounds.masked``.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .layers import AffineLayer, affine_layer, network_layers
from .masked import masked_linear, masked_transpose

__all__ = ["AffineOp", "AffineLayer", "masked_linear", "masked_transpose", "network_layers"]


def AffineOp(layer: nn.Module, in_shape: Sequence[int], norm=None, flatten: bool = False) -> AffineLayer:  # noqa: N802
    """The bound object of one affine module (a registered layer type) on inputs of ``in_shape``,
    with an optional folded leading ``Normalize`` and ``Flatten``."""
    return affine_layer(layer, in_shape, norm, flatten)
