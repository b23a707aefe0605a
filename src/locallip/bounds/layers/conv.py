"""``nn.Conv2d`` (zero padding, groups 1, dilation 1) as a bound layer.

Its guaranteed norm is the smaller of a circulant-embedding (FFT) bound and, where the
explicit operator fits the budget, a Cholesky proof on it (``bounds.exact``); its explicit
matrix is placed entry by entry from the kernel (no rounding beyond the folded std).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...nn.models import Normalize
from ..rounding import fft_symbol_allowance, scaling_allowance, svd_allowance
from .weighted import WeightedLayer

Tensor = torch.Tensor


class ConvLayer(WeightedLayer):
    """A zero-padded ``Conv2d`` on per-sample inputs (C, H, W) (with a folded ``Normalize``)."""

    def __init__(self, layer: nn.Conv2d, in_shape: Sequence[int], norm: Optional[Normalize] = None,
                 flatten: bool = False):
        super().__init__(layer, in_shape, norm, flatten)
        if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
            raise ValueError("only plain zero-padded Conv2d (groups=1, dilation=1) is supported")
        if flatten:
            raise ValueError("Flatten before Conv2d is not supported")
        if len(self.in_shape) != 3:
            raise ValueError(f"Conv2d needs inputs of shape (channels, height, width) per sample, got "
                             f"{self.in_shape}: pass x as a batch [B, C, H, W]")
        if self.in_shape[0] != layer.in_channels:
            raise ValueError(f"Conv2d expects {layer.in_channels} input channels, gets inputs of shape "
                             f"{self.in_shape}")
        c, h, w = self.in_shape
        kh, kw = layer.kernel_size
        (sh, sw), (ph, pw) = layer.stride, layer.padding
        oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        self.out_shape = (layer.out_channels, oh, ow)
        self.output_padding = (h - ((oh - 1) * sh - 2 * ph + kh), w - ((ow - 1) * sw - 2 * pw + kw))

    def _apply(self, v: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(v, weight, None, self.layer.stride, self.layer.padding)

    def transpose(self, u: Tensor) -> Tensor:
        """W^T u, shaped like the layer input."""
        if self.layer.in_channels == 1:
            # One input channel: the transpose is a small matmul and a fold (col2im), ~2x faster
            # on CPU than conv_transpose2d, which is slow for this shape.
            k = self.layer.kernel_size
            cols = torch.matmul(self.weight.reshape(self.weight.shape[0], -1).T, u.flatten(2))
            v = F.fold(cols, self.in_shape[1:], k, padding=self.layer.padding, stride=self.layer.stride)
        else:
            v = F.conv_transpose2d(u, self.weight, None, self.layer.stride, self.layer.padding,
                                   self.output_padding)
        return self._scale(v)

    def _folded_kernel(self) -> Tensor:
        w = self.weight.detach().double()
        if self.norm is not None:
            w = w / self.norm.std.double().view(1, -1, 1, 1)
        return w

    def fft_norm_bound(self) -> Tensor:
        """Upper bound of the zero-padded, possibly strided convolution's spectral norm.

        A stride-s conv is a stride-1 conv on the s*s polyphase components of its input (a
        permutation, so norm-preserving). That conv is a restriction of a circular convolution
        on a torus large enough that nothing wraps around (zero-embedded input, subset of
        outputs), whose norm is the largest singular value of the kernel's 2-D DFT over all
        frequencies.
        """
        _, h, wd = self.in_shape
        (sh, sw) = self.layer.stride
        k = polyphase_kernel(self._folded_kernel(), self.layer.stride, self.layer.padding)
        size = (-(-h // sh) + k.shape[2] + 1, -(-wd // sw) + k.shape[3] + 1)
        spectrum = torch.fft.fft2(k, s=size)  # [co, ci*s*s, N, M]
        raw = torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max()
        return raw + self.fft_rounding(k, size, float(raw))

    def fft_rounding(self, k: Tensor, size, raw: float) -> float:
        """What float64 rounding can take off the FFT bound (``bounds.rounding``): the symbol's FFT
        error, the SVD of each frequency's matrix, and the folded std's division."""
        sym = fft_symbol_allowance(k, size)
        folded = self.folding_rounding()
        return sym + folded + svd_allowance(raw + sym + folded, k.shape[0], k.shape[1])

    def folding_rounding(self) -> float:
        """A bound of the norm of what dividing the kernel by the folded std rounds away (one rounding per
        tap, relative u): a convolution's norm is at most the 2-norm of its per-channel absolute tap sums."""
        if self.norm is None:
            return 0.0
        return scaling_allowance(self._folded_kernel().abs().sum(dim=(2, 3)))

    def guaranteed_norm(self) -> Tensor:
        """The FFT bound, or the Cholesky proof on the explicit operator where it fits and is smaller."""
        from ..exact import proven_layer_norm

        fft = self.fft_norm_bound()
        proof = proven_layer_norm(self)  # proven on the folded (rounded) kernel's explicit matrix
        if proof is None:
            return fft
        return torch.minimum(fft, torch.tensor(proof + self.folding_rounding(), dtype=fft.dtype))

    def explicit_matrix(self) -> Tensor:
        """[n_out, n_in] float64 CPU matrix, every entry a kernel weight placed by index arithmetic."""
        w = self._folded_kernel().cpu()
        co, ci, kh, kw = w.shape
        _, h, wd = self.in_shape
        _, oh, ow = self.out_shape
        (sh, sw), (ph, pw) = self.layer.stride, self.layer.padding
        iy = torch.arange(oh)[:, None] * sh - ph + torch.arange(kh)[None, :]  # [oh, kh]
        ix = torch.arange(ow)[:, None] * sw - pw + torch.arange(kw)[None, :]  # [ow, kw]
        # Broadcast over (co, oy, ox, ci, ky, kx).
        o_c = torch.arange(co).view(co, 1, 1, 1, 1, 1)
        oy = torch.arange(oh).view(1, oh, 1, 1, 1, 1)
        ox = torch.arange(ow).view(1, 1, ow, 1, 1, 1)
        i_c = torch.arange(ci).view(1, 1, 1, ci, 1, 1)
        yy = iy.view(1, oh, 1, 1, kh, 1)
        xx = ix.view(1, 1, ow, 1, 1, kw)
        shape = (co, oh, ow, ci, kh, kw)
        valid = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < wd)).expand(shape)
        rows = (o_c * oh * ow + oy * ow + ox).expand(shape)[valid]
        cols = (i_c * h * wd + yy.clamp(0, h - 1) * wd + xx.clamp(0, wd - 1)).expand(shape)[valid]
        vals = w.view(co, 1, 1, ci, kh, kw).expand(shape)[valid]
        M = torch.zeros(co * oh * ow, ci * h * wd, dtype=torch.float64)
        M[rows, cols] = vals
        return M


def polyphase_kernel(w: Tensor, stride: Tuple[int, int], padding: Tuple[int, int]) -> Tensor:
    """Kernel of the stride-1 convolution that a strided one is on its polyphase components.

    Input pixel s*m + rho is pixel m of component rho, so tap a of a stride-s
    conv reads component (a - p) mod s at offset floor((a - p) / s).
    """
    (sh, sw), (ph, pw) = stride, padding
    co, ci, kh, kw = w.shape
    qh = [(a - ph) // sh for a in range(kh)]
    qw = [(a - pw) // sw for a in range(kw)]
    out = w.new_zeros(co, ci * sh * sw, max(qh) - min(qh) + 1, max(qw) - min(qw) + 1)
    for ah in range(kh):
        for aw in range(kw):
            rh, rw = (ah - ph) % sh, (aw - pw) % sw
            out[:, rh * sw + rw::sh * sw, qh[ah] - min(qh), qw[aw] - min(qw)] = w[:, :, ah, aw]
    return out
