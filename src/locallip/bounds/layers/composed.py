"""Two affine layers in a row as one: ``z = W2 (W1 h + b1) + b2``, operator ``W2 W1``.

``network_layers`` forms one where a layer that ``joins_neighbours`` (a pooling layer: no weights,
no activation of its own) sits next to another affine layer, e.g. ``ReLU, AvgPool2d, Conv2d`` or
``Conv2d, AvgPool2d, ReLU``. Everything follows from the two parts:

* ``linear`` / ``transpose`` / ``forward``: one after the other;
* ``abs_linear``: |W2| |W1| v >= |W2 W1| v;
* ``row_norms``: row k of W2 W1 D is sum_j (W2)_kj row_j(W1 D). Where the rows of W1 have disjoint
  supports (non-overlapping pooling) these are orthogonal, so its norm is exactly
  ||row_k(W2 diag(r))|| with r_j = ||row_j(W1 D)||, i.e. ``W2.row_norms(r)``; otherwise the triangle
  inequality gives |W2| r;
* ``guaranteed_norm``: ||W2|| ||W1||, exact when W1 W1^T = I / m (non-overlapping pooling first);
* ``explicit_matrix``: the float64 product M2 M1, whose rounding (a short sum per entry, and pooling's
  1/m) ``explicit_matrix_error`` bounds; the exact level adds that bound to its proofs.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import AffineLayer

Tensor = torch.Tensor


class ComposedLayer(AffineLayer):
    """``second`` after ``first``, as one affine layer."""

    def __init__(self, first: AffineLayer, second: AffineLayer):
        self.first, self.second = first, second
        self.parts = (first, second)  # applied one after the other (the linear relaxation's rounding)
        self.in_shape, self.out_shape = tuple(first.in_shape), tuple(second.out_shape)
        self.gives_logits = second.gives_logits
        # Two layers without weights (pooling twice) still need a weighted neighbour.
        self.joins_neighbours = getattr(first, "joins_neighbours", False) and getattr(second, "joins_neighbours", False)
        # The part with weights gives the dtype, the device and the module caches are keyed on.
        self._weighted = second if any(True for _ in second.owner.parameters()) else first
        self.owner = self._weighted.owner

    @property
    def dtype(self) -> torch.dtype:
        return self._weighted.dtype

    @property
    def device(self) -> torch.device:
        return self._weighted.device

    def weights_key(self) -> tuple:
        return ("composed",) + tuple(self.first.weights_key()) + tuple(self.second.weights_key())

    def forward(self, h: Tensor) -> Tensor:
        return self.second.forward(self.first.forward(h))

    def linear(self, v: Tensor) -> Tensor:
        return self.second.linear(self.first.linear(v))

    def transpose(self, u: Tensor) -> Tensor:
        return self.first.transpose(self.second.transpose(u))

    def abs_linear(self, v: Tensor) -> Tensor:
        return self.second.abs_linear(self.first.abs_linear(v))

    def row_norms(self, col_mask: Optional[Tensor] = None) -> Tensor:
        if col_mask is None:
            col_mask = torch.ones((1,) + self.in_shape, dtype=self.dtype, device=self.device)
        inner = self.first.row_norms(col_mask)
        if getattr(self.first, "disjoint_rows", False):
            return self.second.row_norms(inner)
        return self.second.abs_linear(inner)

    def cast(self, dtype: torch.dtype) -> "ComposedLayer":
        return ComposedLayer(self.first.cast(dtype), self.second.cast(dtype))

    def logit_weights(self):
        """(W2 W1 [C, d], W2 b1 + b2): the logits from the flattened input of the first part."""
        w2, _ = self.second.logit_weights()
        weight = self.first.transpose(w2.reshape(w2.shape[0], *self.first.out_shape)).flatten(1)
        bias = self.forward(torch.zeros((1,) + self.in_shape, dtype=w2.dtype, device=w2.device))[0]
        return weight, bias

    def explicit_matrix(self) -> Tensor:
        return self.second.explicit_matrix() @ self.first.explicit_matrix()

    def explicit_matrix_error(self) -> float:
        """||W2 W1 - fl(M2 M1)||_F <= (gamma_k + e1 + e2) || |M2| |M1| ||_F + ..., k the most products in one
        entry, e1, e2 the parts' own relative entry errors (u for pooling's 1/m, 0 where placed exactly);
        the parts' absolute errors add through ||M2||_F and ||M1||_F."""
        m2, m1 = self.second.explicit_matrix(), self.first.explicit_matrix()
        terms = int(((m2 != 0).double() @ (m1 != 0).double()).max()) if m2.numel() and m1.numel() else 0
        u = 2.0 ** -53
        gamma = terms * u / (1 - terms * u) + 2 * u  # the product, and one rounding of 1/m in a pooling part
        magnitude = float((m2.abs() @ m1.abs()).norm())
        spread = self.second.explicit_matrix_error() * float(m1.norm()) + self.first.explicit_matrix_error() * (
            float(m2.norm()) + self.second.explicit_matrix_error())
        return (gamma * magnitude + spread) * (1 + 8 * u)

    def guaranteed_norm(self) -> Tensor:
        # One rounding of the product, covered by rounding up.
        return self.second.guaranteed_norm() * self.first.guaranteed_norm() * (1 + 2.0 ** -52)
