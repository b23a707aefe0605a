"""``nn.AvgPool2d`` as a bound layer: a fixed linear map with known entries and a known norm.

Output pixel (c, i, j) is the mean over its k_h x k_w window of channel c (zero padding counted
in the divisor, PyTorch's default): every row of W holds m = k_h k_w entries 1/m (fewer at a padded
border), the same map on every channel. So ``linear`` is the pooling itself, ``transpose`` spreads
each output back over its window, ``|W| = W`` and row norms are sqrt(count) / m.

Its norm: by the Schur test ||W||^2 <= (largest row sum) (largest column sum) = (R / m) (K / m),
with R the most in-bounds entries of a window and K the most windows covering one pixel. With
non-overlapping windows (stride = kernel, no padding) R = m and K = 1: ||W|| = 1/sqrt(m) exactly,
1/k for k x k pooling, since W W^T = I / m. Overlapping windows are also given the Cholesky proof
on one channel's explicit matrix where it fits (``bounds.exact``), and the smaller bound is kept.

A pooling layer has no weights and no activation of its own: next to a Conv2d or Linear it joins
that layer into one affine layer (``joins_neighbours``, ``composed.ComposedLayer``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.models import pooling_problem
from .base import AffineLayer

Tensor = torch.Tensor


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


class AvgPoolLayer(AffineLayer):
    """Average pooling on per-sample inputs (C, H, W): W is block-diagonal over channels."""

    joins_neighbours = True

    def __init__(self, module: nn.AvgPool2d, in_shape: Sequence[int], norm=None, flatten: bool = False,
                 dtype: torch.dtype = torch.float32):
        problem = pooling_problem(module)
        if problem:
            raise ValueError(problem)
        if norm is not None or flatten:
            raise ValueError("AvgPool2d directly after Normalize or Flatten is not supported")
        if len(in_shape) != 3:
            raise ValueError(f"AvgPool2d needs inputs of shape (channels, height, width), got {tuple(in_shape)}")
        self.owner = module
        self.in_shape = tuple(in_shape)
        self.kernel = _pair(module.kernel_size)
        self.stride = _pair(module.stride if module.stride is not None else module.kernel_size)
        self.padding = _pair(module.padding)
        self._dtype = dtype  # no weights to take it from: ``cast`` sets it, a composed layer overrides it
        c, h, w = self.in_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"AvgPool2d kernel {self.kernel} does not fit inputs of shape {self.in_shape}")
        self.out_shape = (c, oh, ow)
        self.output_padding = (h - ((oh - 1) * sh - 2 * ph + kh), w - ((ow - 1) * sw - 2 * pw + kw))
        self.window = kh * kw
        # Every input feeds at most one output (disjoint rows): what makes a composition's row norms exact.
        self.disjoint_rows = sh >= kh and sw >= kw

    dtype = property(lambda self: self._dtype)
    device = property(lambda self: torch.device("cpu"))

    def weights_key(self) -> tuple:
        return (id(self.owner), self.kernel, self.stride, self.padding)

    def forward(self, h: Tensor) -> Tensor:
        return self.owner(h)

    def linear(self, v: Tensor) -> Tensor:
        return F.avg_pool2d(v, self.kernel, self.stride, self.padding)

    def transpose(self, u: Tensor) -> Tensor:
        """W^T u: every output's value / m spread over its window."""
        c = self.in_shape[0]
        ones = u.new_full((c, 1) + self.kernel, 1.0 / self.window)
        return F.conv_transpose2d(u, ones, None, self.stride, self.padding, self.output_padding, groups=c)

    def abs_linear(self, v: Tensor) -> Tensor:
        return self.linear(v)  # W >= 0 entrywise

    def row_norms(self, col_mask: Optional[Tensor] = None) -> Tensor:
        """sqrt(sum over the window of col_mask^2) / m per output."""
        if col_mask is None:
            col_mask = torch.ones((1,) + self.in_shape, dtype=self.dtype)
        sq = self.linear(col_mask.square()) / self.window
        return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()

    def cast(self, dtype: torch.dtype) -> "AvgPoolLayer":
        op = type(self).__new__(type(self))
        op.__dict__.update(self.__dict__)
        op._dtype = dtype
        return op

    def explicit_matrix(self) -> Tensor:
        """[n_out, n_in] float64: entry 1/m (one rounding, none where m is a power of two) at every
        in-bounds window position, by index arithmetic."""
        c, h, w = self.in_shape
        _, oh, ow = self.out_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        ch = torch.arange(c).view(c, 1, 1, 1, 1)
        oy = torch.arange(oh).view(1, oh, 1, 1, 1)
        ox = torch.arange(ow).view(1, 1, ow, 1, 1)
        yy = oy * sh - ph + torch.arange(kh).view(1, 1, 1, kh, 1)
        xx = ox * sw - pw + torch.arange(kw).view(1, 1, 1, 1, kw)
        shape = (c, oh, ow, kh, kw)
        valid = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)).expand(shape)
        rows = (ch * oh * ow + oy * ow + ox).expand(shape)[valid]
        cols = (ch * h * w + yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).expand(shape)[valid]
        M = torch.zeros(c * oh * ow, c * h * w, dtype=torch.float64)
        M[rows, cols] = 1.0 / self.window
        return M

    def schur_norm_bound(self) -> float:
        """sqrt(R K) / m (see the module docstring), rounded up."""
        ones = torch.ones((1, 1) + self.in_shape[1:], dtype=torch.float64)
        one_channel = self.cast(torch.float64)
        one_channel.in_shape = (1,) + self.in_shape[1:]
        rows = round(float(one_channel.linear(ones).max()) * self.window)  # in-bounds entries per window
        cols = round(float(F.conv_transpose2d(torch.ones((1, 1) + self.out_shape[1:], dtype=torch.float64),
                                              torch.ones((1, 1) + self.kernel, dtype=torch.float64), None,
                                              self.stride, self.padding, self.output_padding).max()))
        bound = math.sqrt(rows * cols) / self.window
        return math.nextafter(math.nextafter(bound, math.inf), math.inf)  # two roundings, each covered

    def guaranteed_norm(self) -> Tensor:
        """The Schur bound, or the proof on one channel (W is the same block on every channel) where
        windows overlap, it fits the budget and it is smaller."""
        bound = self.schur_norm_bound()
        if not self.disjoint_rows or self.padding != (0, 0):
            from ..exact import proven_layer_norm

            one_channel = AvgPoolLayer(self.owner, (1,) + self.in_shape[1:], dtype=torch.float64)
            proof = proven_layer_norm(one_channel)
            bound = bound if proof is None else min(bound, proof)
        return torch.tensor(bound, dtype=torch.float64)


def avgpool_layer(module: nn.AvgPool2d, in_shape: Sequence[int], norm=None, flatten: bool = False) -> AvgPoolLayer:
    return AvgPoolLayer(module, in_shape, norm, flatten)
