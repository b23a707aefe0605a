"""Activations as the bounds see them: ``LipschitzActivation`` modules answer for themselves;
``torch.nn.ReLU`` (of networks trained elsewhere) gets an adapter with the same answers."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .base import ActivationBounds

Tensor = torch.Tensor


class TorchReLUBounds(ActivationBounds):
    """``nn.ReLU``: max(t, 0), fixed (always off) where ub <= 0."""

    def __init__(self, module: nn.ReLU):
        self.module = module

    def __call__(self, z: Tensor) -> Tensor:
        return torch.relu(z)

    def interval(self, lb: Tensor, ub: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.relu(lb), torch.relu(ub)

    def masks(self, lb: Tensor, ub: Tensor) -> Tuple[Tensor, Tensor]:
        v = (ub > 0).to(lb.dtype)
        return v, v

    def fixed_distance(self, lb: Tensor, ub: Tensor) -> Tensor:
        return torch.relu(ub)


def itself(module: nn.Module) -> nn.Module:
    """A ``LipschitzActivation`` is its own bound object."""
    return module
