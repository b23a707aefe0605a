"""A residual block ``y = x + conv(x)`` (``nn.blocks.ResidualConv2d``) as one affine layer, ``I + W``.

With 'same' zero padding and stride 1, ``I + W`` is itself a convolution: the kernel of W plus the
identity kernel E (1 at the centre tap from channel c to channel c), and the identity's tap never
falls on the padding. So the block is a ``ConvLayer`` whose kernel is ``K + E``: its products,
``|I + W|`` (interval radii), row norms (ball bounds), the FFT bound (the largest singular value of
``I + W``'s symbol: the identity added to each frequency's matrix), the explicit matrix and the
Cholesky proof all follow from that kernel. The model's own forward, ``x + conv(x)``, is kept for
the clean pass.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...nn.blocks import ResidualConv2d
from ..rounding import UNIT_ROUNDOFF
from .conv import ConvLayer

Tensor = torch.Tensor



def identity_kernel(like: Tensor) -> Tensor:
    """E: the kernel of the identity map for a square, odd, 'same'-padded convolution shaped like ``like``."""
    co, ci, kh, kw = like.shape
    e = torch.zeros_like(like)
    e[:, :, kh // 2, kw // 2] = torch.eye(co, ci, dtype=like.dtype, device=like.device)
    return e


class ResidualConvLayer(ConvLayer):
    """``I + W`` of a ``ResidualConv2d`` on per-sample inputs (C, H, W)."""

    def __init__(self, block: ResidualConv2d, in_shape: Sequence[int], norm=None, flatten: bool = False):
        if norm is not None or flatten:
            raise ValueError("a residual block cannot take a folded Normalize or Flatten: put a Conv2d or Linear "
                             "layer before it")
        super().__init__(block.conv, in_shape)
        if self.out_shape != self.in_shape:
            raise ValueError(f"a residual block must keep its input's shape {self.in_shape}, gives {self.out_shape}")
        self.block = self.owner = block

    @property
    def weight(self) -> Tensor:
        """The kernel of ``I + W`` (K + E), differentiable in K."""
        k = self.layer.weight if self._weight is None else self._weight
        return k + identity_kernel(k)

    def forward(self, h: Tensor) -> Tensor:
        """x + conv(x), exactly as the model computes it."""
        return self.block(h)

    def _folded_kernel(self) -> Tensor:
        # K + E formed in float64 (in the model's dtype, 1 + k would round to that dtype's precision).
        k = self.layer.weight.detach().double()
        return k + identity_kernel(k)

    def _centre_rounding(self) -> float:
        """A bound of ||I + W - M|| for M built from the float64 kernel: only 1 + k_cc rounds (once, by at
        most u |1 + k_cc|), and those errors sit on the diagonal of M."""
        k = self._folded_kernel()
        kh, kw = k.shape[2:]
        return UNIT_ROUNDOFF * float(torch.diagonal(k[:, :, kh // 2, kw // 2]).abs().max())

    def fft_norm_bound(self) -> Tensor:
        """``ConvLayer``'s circulant-embedding bound on K + E (with its FFT and SVD rounding allowance),
        plus the float64 rounding of the centre taps 1 + k_cc (``_centre_rounding``)."""
        return super().fft_norm_bound() + self._centre_rounding()

    def guaranteed_norm(self) -> Tensor:
        """The smaller of the FFT bound and the Cholesky proof on the explicit matrix, each plus the rounding of
        the float64 diagonal entries 1 + k_cc (Weyl: a perturbation of norm <= e moves the norm by <= e)."""
        from ..exact import proven_layer_norm

        fft = self.fft_norm_bound()
        proof = proven_layer_norm(self)
        if proof is None:
            return fft
        return torch.minimum(fft, torch.tensor(proof + self._centre_rounding() + self.folding_rounding(),
                                               dtype=fft.dtype))
