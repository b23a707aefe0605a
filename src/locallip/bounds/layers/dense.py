"""``nn.Linear`` as a bound layer: W v is a matrix product; its norm is the exact SVD."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.models import Normalize
from ..rounding import scaling_allowance, svd_allowance
from .base import check_input_shape
from .weighted import WeightedLayer

Tensor = torch.Tensor


class DenseLayer(WeightedLayer):
    """A ``Linear`` layer (after an optional ``Flatten`` and a folded ``Normalize``)."""

    gives_logits = True

    def __init__(self, layer: nn.Linear, in_shape: Sequence[int], norm: Optional[Normalize] = None,
                 flatten: bool = False):
        super().__init__(layer, in_shape, norm, flatten)
        check_input_shape(self.in_shape, layer.in_features, "Linear")
        self.out_shape = (layer.out_features,)

    def _apply(self, v: Tensor, weight: Tensor) -> Tensor:
        return F.linear(v.flatten(1), weight)

    def transpose(self, u: Tensor) -> Tensor:
        """W^T u, shaped like the layer input."""
        return self._scale((u @ self.weight).view(u.shape[0], *self.in_shape))

    def logit_weights(self):
        return self.layer.weight, self.layer.bias

    def explicit_matrix(self) -> Tensor:
        """The weight itself (over the folded std: one rounding per entry)."""
        w = self.weight.detach().double().cpu()
        if self.norm is not None:
            w = w * (1.0 / self.norm.std.detach().double().cpu()).expand(self.in_shape).reshape(1, -1)
        return w

    def guaranteed_norm(self) -> Tensor:
        """The SVD of the (folded) weight in float64, plus what rounding can take off it
        (``bounds.rounding``: the SVD's backward error and the folded std's one rounding per entry)."""
        w = self.weight.detach().double()
        folded = 0.0
        if self.norm is not None:  # Normalize before Linear: scale every flattened input by 1/std of its channel
            scale = (1.0 / self.norm.std.double()).expand(self.in_shape).reshape(1, -1)
            w = w * scale
            folded = scaling_allowance(w, roundings=2)  # 1 / std, then the product
        sigma = torch.linalg.matrix_norm(w, ord=2)
        return sigma + (folded + svd_allowance(float(sigma) + folded, *w.shape))
