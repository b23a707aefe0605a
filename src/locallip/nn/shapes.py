"""The output shape of a layer from its input shape, by formula.

Checking an architecture by running its layers on the meta device is exact, but many meta
kernels are Python decompositions whose first call imports torch's compiler (about two
seconds, more than certifying a small network). The layers below get their shapes by the
same rules torch applies; any other module is still run on the meta device.
Shapes exclude the batch dimension.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .activations import ClippedMaxMin, ClippedReLU, MaxMin, ReLU
from .blocks import ResidualConv2d
from .models import Normalize

Shape = Tuple[int, ...]


def _conv2d(m: nn.Conv2d, shape: Shape) -> Shape:
    if len(shape) != 3 or shape[0] != m.in_channels:
        raise ValueError(f"expected {m.in_channels} input channels in a [C, H, W] input")
    out = []
    for size, k, s, p in zip(shape[1:], m.kernel_size, m.stride, m.padding):
        if size + 2 * p < k:
            raise ValueError(f"kernel size {k} is larger than the padded input size {size + 2 * p}")
        out.append((size + 2 * p - k) // s + 1)
    return (m.out_channels, *out)


def _linear(m: nn.Linear, shape: Shape) -> Shape:
    if not shape or shape[-1] != m.in_features:
        raise ValueError(f"expected {m.in_features} input features in the last dimension")
    return (*shape[:-1], m.out_features)


def _batchnorm(m: nn.modules.batchnorm._BatchNorm, shape: Shape) -> Shape:
    dims = (3,) if isinstance(m, nn.BatchNorm2d) else (1, 2)
    if len(shape) not in dims or shape[0] != m.num_features:
        raise ValueError(f"expected {m.num_features} channels/features in a {'[C, H, W]' if dims == (3,) else '[F]'} input")
    return shape


def _avgpool2d(m: nn.AvgPool2d, shape: Shape) -> Shape:
    pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))
    kernel, stride, padding = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
    if len(shape) != 3:
        raise ValueError("expected a [C, H, W] input")
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError("pad should be at most half of effective kernel size")
    out = []
    for size, k, st, p in zip(shape[1:], kernel, stride, padding):
        if size + 2 * p < k:
            raise ValueError(f"kernel size {k} is larger than the padded input size {size + 2 * p}")
        out.append((size + 2 * p - k) // st + 1)
    return (shape[0], *out)


def _paired(shape: Shape) -> Shape:
    if not shape or shape[0] % 2:
        raise ValueError(f"MaxMin needs an even number of channels/features, got {shape[0] if shape else 0}")
    return shape


def _broadcast(shape: Shape, parameter: torch.Tensor) -> Shape:
    """(batch, *shape) against a per-neuron parameter, as the forward broadcasts them."""
    try:
        return tuple(torch.broadcast_shapes((1, *shape), tuple(parameter.shape)))[1:]
    except RuntimeError as e:
        raise ValueError(str(e)) from None


def _clipped_maxmin(m: ClippedMaxMin, shape: Shape) -> Shape:
    half = (_paired(shape)[0] // 2, *shape[1:])
    hi, lo = _broadcast(half, m.theta_hi), _broadcast(half, m.theta_lo)
    if hi != lo:
        raise ValueError(f"thresholds of shapes {tuple(m.theta_hi.shape)} and {tuple(m.theta_lo.shape)} disagree")
    return (2 * hi[0], *hi[1:]) if hi else hi


def output_shape(m: nn.Module, shape: Shape) -> Optional[Shape]:
    """The shape ``m`` gives an input of ``shape`` (ValueError if it does not fit), or None for
    a module these rules do not cover."""
    if type(m) is nn.Conv2d:
        return _conv2d(m, shape)
    if type(m) is nn.Linear:
        return _linear(m, shape)
    if type(m) is nn.Flatten and (m.start_dim, m.end_dim) == (1, -1):
        return (math.prod(shape),)
    if type(m) is ResidualConv2d:  # x + conv(x): the conv keeps the shape, the sum needs it kept
        if _conv2d(m.conv, shape) != shape:
            raise ValueError(f"a residual block of {m.channels} channels does not keep the shape {shape}")
        return shape
    if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return _batchnorm(m, shape)
    if type(m) is nn.AvgPool2d and not m.ceil_mode:
        return _avgpool2d(m, shape)
    if type(m) in (ReLU, nn.ReLU, Normalize):
        return shape
    if type(m) is MaxMin:
        return _paired(shape)
    if type(m) is ClippedReLU:
        return _broadcast(shape, m.theta)
    if type(m) is ClippedMaxMin:
        return _clipped_maxmin(m, shape)
    return None
