"""Guaranteed layer norms carry what float64 rounding can take off a computed singular value
(``bounds.rounding``): they sit above the raw computed value, by a few 1e-13 of it, and above the
exact SVD of the explicit operator."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from locallip.bounds.layers import ConvLayer, DenseLayer
from locallip.bounds.layers.conv import polyphase_kernel
from locallip.bounds.rounding import UNIT_ROUNDOFF, fft_symbol_allowance, svd_allowance
from locallip.nn.models import Normalize


def _raw_fft_norm(layer: ConvLayer) -> float:
    """The circulant-embedding value as computed, without any allowance."""
    _, h, w = layer.in_shape
    sh, sw = layer.layer.stride
    k = polyphase_kernel(layer._folded_kernel(), layer.layer.stride, layer.layer.padding)
    size = (-(-h // sh) + k.shape[2] + 1, -(-w // sw) + k.shape[3] + 1)
    spectrum = torch.fft.fft2(k, s=size)
    return float(torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max())


@pytest.mark.parametrize("stride,norm", [(1, False), (2, False), (2, True)])
def test_conv_fft_bound_carries_its_rounding_allowance(stride, norm):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=1).double()
    layer = ConvLayer(conv, (3, 8, 8), norm=Normalize([0.1, 0.2, 0.3], [0.2, 0.3, 0.4]) if norm else None)
    raw = _raw_fft_norm(layer)
    bound = float(layer.fft_norm_bound())
    assert bound > raw  # fails without the allowance: the bound was the raw computed value
    assert bound - raw < 1e-11 * raw  # and the allowance is rounding-sized
    exact = float(torch.linalg.matrix_norm(layer.explicit_matrix(), ord=2))
    assert float(layer.guaranteed_norm()) >= exact


@pytest.mark.parametrize("norm", [False, True])
def test_dense_norm_carries_its_rounding_allowance(norm):
    torch.manual_seed(1)
    lin = nn.Linear(12, 7).double()
    layer = DenseLayer(lin, (3, 2, 2), norm=Normalize([0.1, 0.2, 0.3], [0.2, 0.3, 0.4]) if norm else None,
                       flatten=True)
    raw = float(torch.linalg.matrix_norm(layer.explicit_matrix(), ord=2))
    bound = float(layer.guaranteed_norm())
    assert raw < bound < raw * (1 + 1e-11)


def test_allowances_grow_with_what_they_bound():
    k = torch.ones(2, 2, 3, 3, dtype=torch.float64)
    assert fft_symbol_allowance(2 * k, (10, 10)) == pytest.approx(2 * fft_symbol_allowance(k, (10, 10)))
    assert fft_symbol_allowance(k, (64, 64)) > fft_symbol_allowance(k, (8, 8))
    assert svd_allowance(1.0, 10, 3) == pytest.approx(80 * UNIT_ROUNDOFF)
