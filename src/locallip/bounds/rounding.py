"""What float64 rounding can take off a computed layer norm, so guaranteed norms stay upper bounds.

A guaranteed norm is computed in float64, and a computed singular value can sit a little below the
true one. Each allowance below bounds that error from above (standard backward-error results, with
generous constants), and the guaranteed norms add it: a few 1e-13 of the norm, which changes no
certificate but makes the bound a bound.
"""
from __future__ import annotations

import math

import numpy as np
import torch

Tensor = torch.Tensor

#: Unit roundoff of float64.
UNIT_ROUNDOFF = float(np.finfo(np.float64).eps) / 2


def gamma(m: int) -> float:
    """gamma_m = m u / (1 - m u): the relative error bound of m successive rounded operations."""
    return m * UNIT_ROUNDOFF / (1 - m * UNIT_ROUNDOFF)


def svd_allowance(sigma: float, rows: int, cols: int) -> float:
    """A bound of sigma_true - sigma_computed for the largest singular value of a rows x cols matrix.

    The SVD is backward stable: the computed values are those of W + E with ||E|| <= c u ||W||
    (c a modest function of the dimensions; 8 max(rows, cols) is generous), and by Weyl a
    perturbation of norm e moves each singular value by at most e.
    """
    return 8 * UNIT_ROUNDOFF * max(rows, cols) * sigma


def scaling_allowance(w: Tensor, roundings: int = 1) -> float:
    """A bound of the norm of the rounding error of an entry-wise scaling (e.g. a weight divided by a
    folded std) that took ``roundings`` rounded operations per entry: each entry is off by at most
    gamma_roundings |w_ij|, and ||E|| <= ||E||_F <= gamma_roundings ||W||_F."""
    return gamma(roundings) * float(w.double().norm())


def fft_symbol_allowance(kernel: Tensor, size) -> float:
    """A bound of the norm of the error of a convolution symbol computed by a 2-D FFT of ``kernel``.

    ``kernel``: [co, ci, kh, kw]; ``size``: the FFT grid. Each symbol entry is a sum of the taps times
    unit roots; the FFT computes it with relative error gamma_m over the absolute tap sum A_ab
    (m: the FFT's levels plus the taps, doubled for complex arithmetic), so each frequency's matrix
    of errors has norm <= gamma_m ||A||_F.
    """
    co, ci, kh, kw = kernel.shape
    n = int(size[0]) * int(size[1])
    m = 2 * (math.ceil(math.log2(max(n, 2))) + kh * kw) + 8
    tap_sums = kernel.detach().double().abs().sum(dim=(2, 3))
    return gamma(m) * float(tap_sums.norm())
