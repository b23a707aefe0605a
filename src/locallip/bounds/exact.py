"""Deterministic upper bounds of masked layer norms: an explicit Gram matrix and a Cholesky proof.

For A_b = diag(row_b) W diag(col_b), ||A_b||^2 = lambda_max(G_b) with G_b the Gram
matrix of the smaller side (A^T A on the inputs or A A^T on the outputs). For a
trial value t, a Cholesky factorisation of t I - G_b that succeeds proves
t I - G_b positive definite up to rounding, i.e. lambda_max(G_b) < t. We make
the rounding explicit and add it to t:

* forming G_b: every entry is a sum of at most N products, so
  ||G_fl - G|| <= gamma_N ||M||_F^2 (gamma_N = N u / (1 - N u), M the explicit operator);
* the factorisation (bandwidth w, order n): R^T R = (t I - G_fl) + E with
  ||E|| <= gamma_{w+1} / (1 - gamma_{w+1}) * tr(t I - G_fl) (Demmel 1989; Rump 2006);
* forming t I - G_fl: one rounding per diagonal entry, <= u (t + max |G_ii|).

Where the explicit operator M is itself a rounded product (a composed layer), its entry error
bound ``explicit_matrix_error`` (a Frobenius norm) is added to the proven norm.

If the factorisation succeeds, lambda_max(G_b) <= t + those three terms, and the
returned norm is the square root of that, rounded up. t comes from a converged
Lanczos estimate (a slightly larger t is tried when the first fails); where no
t is proven, or the layer is too large for the memory/time budget, the layer's
guaranteed global norm is used instead.

Convolutions are banded once their coordinates are ordered position-major
(pixel by pixel, channels inside): only outputs whose receptive fields overlap
interact. G_b is the full Gram matrix minus the outer products of the fixed
inner coordinates, kept in LAPACK's band storage, and factorised by
``scipy.linalg.cholesky_banded``.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from .layers.base import AffineLayer
from .records import LayerRecord
from .settings import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_FLOPS
from .solvers import LayerNorms

Tensor = torch.Tensor

#: Trial values t = sigma_est^2 * factor, tried in order until one is proven.
TRIAL_FACTORS = (1.0 + 1e-6, 1.0 + 1e-3, 1.02, 1.1)
_U = float(np.finfo(np.float64).eps) / 2  # unit roundoff of float64


def _gamma(n: int) -> float:
    nu = n * _U
    if nu >= 0.5:
        raise ValueError(f"problem too large for the rounding analysis (n = {n})")
    return nu / (1 - nu)


def _position_major(shape: Tuple[int, ...]) -> Tensor:
    """Permutation p of the flattened (C, H, W) coordinates such that x.flatten()[p] is position-major."""
    if len(shape) != 3:
        return torch.arange(math.prod(shape))
    c, h, w = shape
    idx = torch.arange(c * h * w).view(c, h, w)
    return idx.permute(1, 2, 0).reshape(-1)


@dataclass
class ExactLayer:
    """What one layer needs, computed once per weights: the band of the full Gram matrix and the
    sparse inner vectors (columns of M for side="output", rows for side="input")."""

    side: str
    n: int  # order of the Gram matrix
    bandwidth: int
    band: np.ndarray  # [w + 1, n] lower band storage of the full Gram matrix (position-major)
    inner_idx: Tensor  # [n_inner, nnz] outer-space indices of each inner vector's nonzeros (position-major)
    inner_val: Tensor  # [n_inner, nnz] their values (0 for padding)
    outer_perm: Tensor  # position-major index -> flattened outer coordinate (PyTorch order)
    frob2: float  # ||M||_F^2
    max_terms: int  # most products in one Gram entry (for the rounding bound)
    entry_error: float = 0.0  # ||M_true - M||_F bound where M is itself rounded (``explicit_matrix_error``)


def build_exact_layer(op: AffineLayer, side: str, max_entries: int = DEFAULT_MAX_ENTRIES,
                      max_flops: int = DEFAULT_MAX_FLOPS) -> Optional[ExactLayer]:
    """The explicit Gram structure of one layer, or None when it exceeds the budget."""
    n_in, n_out = math.prod(op.in_shape), math.prod(op.out_shape)
    if n_in * n_out > max_entries:
        return None
    M = op.explicit_matrix()  # [n_out, n_in], float64 on the CPU
    out_shape, in_shape = tuple(op.out_shape), tuple(op.in_shape)
    if side == "output":  # Gram over outputs: inner vectors are the columns of M
        outer_shape, S = out_shape, M
    else:  # Gram over inputs: inner vectors are the rows of M
        outer_shape, S = in_shape, M.T
    perm = _position_major(outer_shape)
    S = S[perm]  # rows: outer coordinates in position-major order; columns: inner coordinates
    n = S.shape[0]
    nz = S != 0
    with warnings.catch_warnings():  # torch calls its sparse CSR support "beta"; the product is exact
        warnings.simplefilter("ignore", UserWarning)
        G = (S.to_sparse_csr() @ S.T.to_sparse_csr()).to_dense()  # S is sparse for convolutions: ~2x faster
    nzG = (G != 0).nonzero()
    w = int((nzG[:, 0] - nzG[:, 1]).abs().max()) if nzG.numel() else 0
    if n * (w + 1) ** 2 > max_flops:
        return None
    band = np.zeros((w + 1, n))
    Gn = G.numpy()
    for d in range(w + 1):
        band[d, :n - d] = np.diagonal(Gn, offset=-d)
    counts = nz.sum(dim=0)  # nonzeros of every inner vector
    nnz = max(int(counts.max()), 1)
    # Per inner vector, the outer indices of its nonzeros first (a stable sort keeps them in order).
    order = torch.argsort((~nz).T.to(torch.int8), dim=1, stable=True)[:, :nnz]
    valid = torch.arange(nnz)[None, :] < counts[:, None]
    inner_idx = torch.where(valid, order, torch.zeros_like(order))
    inner_val = torch.where(valid, S.T.gather(1, order), torch.zeros(1, dtype=torch.float64))
    return ExactLayer(side=side, n=n, bandwidth=w, band=band, inner_idx=inner_idx, inner_val=inner_val,
                      outer_perm=perm, frob2=float((M * M).sum()),
                      max_terms=int(nz.sum(dim=1).max()) if n else 1, entry_error=op.explicit_matrix_error())


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def exact_layer(op: AffineLayer, side: str, max_entries: int = DEFAULT_MAX_ENTRIES,
                max_flops: int = DEFAULT_MAX_FLOPS) -> Optional[ExactLayer]:
    """``build_exact_layer``, cached per layer (its owning module) until its weights change."""
    key = (side, op.weights_key(), tuple(op.in_shape), max_entries, max_flops)
    hit = _CACHE.get(op.owner)
    if hit is not None and hit[0] == key:
        return hit[1]
    layer = build_exact_layer(op, side, max_entries, max_flops)
    _CACHE[op.owner] = (key, layer)
    return layer


def _sample_band(ex: ExactLayer, inner_mask: Optional[np.ndarray], outer_mask: Optional[np.ndarray]) -> np.ndarray:
    """Lower band of G_b = sum over active inner vectors of v v^T, outer coordinates masked."""
    n, w = ex.n, ex.bandwidth
    if inner_mask is None:
        band = ex.band.copy()
    else:
        fixed = np.flatnonzero(inner_mask == 0)
        active = np.flatnonzero(inner_mask != 0)
        if len(fixed) <= len(active):  # downdate the full Gram matrix
            band, use, sign = ex.band.copy(), fixed, -1.0
        else:  # build from the (fewer) active vectors
            band, use, sign = np.zeros_like(ex.band), active, 1.0
        if len(use):
            idx = ex.inner_idx[use].numpy()
            val = ex.inner_val[use].numpy()
            r = idx[:, :, None]
            c = idx[:, None, :]
            prod = val[:, :, None] * val[:, None, :]
            keep = (r >= c) & (prod != 0)
            flat = ((r - c) * n + c)[keep]  # band[r - c, c] holds G[r, c]
            band += sign * np.bincount(flat, weights=prod[keep], minlength=band.size).reshape(band.shape)
    if outer_mask is not None:
        off = np.flatnonzero(outer_mask == 0)
        if len(off):
            band[:, off] = 0.0  # column c of the band holds G[c + d, c]
            for d in range(1, w + 1):
                rows = off[off >= d]
                band[d, rows - d] = 0.0
    return band


def proven_norm(ex: ExactLayer, inner_mask: Optional[np.ndarray], outer_mask: Optional[np.ndarray],
                estimate: float) -> Optional[float]:
    """An upper bound of ||A_b|| proven by a banded Cholesky factorisation, or None."""
    from scipy.linalg import LinAlgError, cholesky_banded

    band = _sample_band(ex, inner_mask, outer_mask)
    n, w = ex.n, ex.bandwidth
    gmax = max(float(band[0].max()), 0.0) if n else 0.0
    n_fixed = 0 if inner_mask is None else int((inner_mask == 0).sum())
    form_err = 2 * _gamma(ex.max_terms + n_fixed + 2) * ex.frob2
    base = max(estimate * estimate, 0.0)
    for factor in TRIAL_FACTORS:
        # Never below the rounding level of G itself (an operator that is 0 up to rounding).
        t = max(base * factor, 4 * form_err, np.finfo(np.float64).tiny)
        m = -band.copy()
        m[0] += t
        try:
            cholesky_banded(m, lower=True, check_finite=False)
        except LinAlgError:
            continue
        trace = float(m[0].sum()) * (1 + _gamma(n + 1))
        chol_err = _gamma(w + 1) / (1 - _gamma(w + 1)) * trace
        t_cert = t + form_err + chol_err + _U * (t + gmax)
        proven = math.sqrt(t_cert) * (1 + 4 * _U)
        if ex.entry_error:  # ||A_true|| <= ||A|| + ||M_true - M||_F (masks only shrink it); the sum rounded up
            proven = (proven + ex.entry_error) * (1 + 2 * _U)
        return proven
    return None


def proven_layer_norm(op: AffineLayer, max_entries: int = DEFAULT_MAX_ENTRIES,
                      max_flops: int = DEFAULT_MAX_FLOPS) -> Optional[float]:
    """A proven upper bound of the (unmasked) layer's norm ||W||, or None over the budget.

    For convolutions this is tighter than the circulant-embedding bound, which ignores that
    zero padding cuts the kernel off at the borders (about 1 % on a 14 x 14 map).
    """
    from .krylov import choose_side
    from .spectral import restarted_lanczos_norm

    ex = exact_layer(op, choose_side(op), max_entries, max_flops)
    if ex is None:
        return None
    o = op.cast(torch.float64)
    v0 = torch.randn((1,) + tuple(op.in_shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    est = restarted_lanczos_norm(o, None, None, v0.to(o.device), max_applications=5000, tol=1e-7)
    return proven_norm(ex, None, None, float(est.sigma[0]))


def exact_masked_norms(op: AffineLayer, col_mask: Optional[Tensor], row_mask: Tensor, estimate: Tensor,
                       side: str, max_entries: int = DEFAULT_MAX_ENTRIES,
                       max_flops: int = DEFAULT_MAX_FLOPS) -> Tuple[Tensor, Tensor]:
    """Per sample, a proven upper bound of ||diag(row) W diag(col)|| (NaN where none was proven).

    Returns (bounds [B], proven [B] bool). ``estimate`` is a converged (from-below) estimate of
    each norm: the trial values of the proof are placed just above its square.
    """
    batch = estimate.shape[0]
    out = torch.full((batch,), float("nan"), dtype=torch.float64)
    proven = torch.zeros(batch, dtype=torch.bool)
    ex = exact_layer(op, side, max_entries, max_flops)
    if ex is None:
        return out, proven
    in_perm_outer = ex.outer_perm
    if side == "output":
        inner_m = None if col_mask is None else col_mask.detach().flatten(1).cpu().numpy()
        outer_m = row_mask.detach().flatten(1).cpu()[:, in_perm_outer].numpy()
    else:
        inner_m = row_mask.detach().flatten(1).cpu().numpy()
        outer_m = None if col_mask is None else col_mask.detach().flatten(1).cpu()[:, in_perm_outer].numpy()
    est = estimate.detach().double().cpu().numpy()
    for b in range(batch):
        im = None if inner_m is None else inner_m[b if inner_m.shape[0] > 1 else 0]
        om = None if outer_m is None else outer_m[b if outer_m.shape[0] > 1 else 0]
        v = proven_norm(ex, im, om, float(est[b]))
        if v is not None:
            out[b] = v
            proven[b] = True
    return out.to(estimate.device), proven.to(estimate.device)


def exact_layer_solver(global_norms: Tensor, settings, layers: list, fallback=None, quick_steps: int = 16):
    """Per-layer solver of the exact level: a Cholesky proof placed just above a converged estimate.

    ``settings`` (``NormSettings``) gives the estimate's budget (``max_iter``, ``tol``,
    ``work_dtype``), the proof's (``exact_max_entries``, ``exact_max_flops``) and
    ``exact_near_global``: when > 0, a quick estimate from below (``quick_steps`` Lanczos steps
    from the start ``v0``) comes first, and where it is within that fraction of the layer's
    guaranteed global norm, the masks change the norm by at most that much and the global norm
    is used (deterministic, no proof needed). Where no proof succeeds (or the layer is over the
    budget) the layer's guaranteed global norm is used, or, with ``fallback`` (the probabilistic
    level's solver), the probabilistic bound of those samples. What each layer rests on is
    appended to ``layers``.
    """
    from .krylov import _empty, lanczos_norm

    def solve(l, op, col_mask, row_mask, v0):
        batch = v0.shape[0]
        g = global_norms[l].expand(batch)
        job = _ProofJob(op, col_mask, row_mask, g, g.clone(), torch.ones(batch, dtype=torch.bool, device=g.device))
        # A mask that removes every row or column leaves the zero operator: norm 0 exactly.
        zero = _empty(row_mask, batch, g.device) | _empty(col_mask, batch, g.device)
        job.upper[zero] = 0.0
        todo = ~zero
        start, work = v0, 0
        if settings.exact_near_global > 0 and bool(todo.any()):
            quick = lanczos_norm(op, col_mask, row_mask, v0, steps=quick_steps, work_dtype=settings.work_dtype)
            todo &= quick.sigma < (1 - settings.exact_near_global) * g
            start, work = quick.vector, int(quick.steps.max())
        entry = LayerRecord(proven=int(zero.sum()), near_global=int((~todo & ~zero).sum()))
        idx = todo.nonzero().squeeze(1)
        if idx.numel():
            work += _prove(job, start, idx, entry, settings)
            if fallback is not None:
                _fall_back(job, start, idx[~job.proven_at(idx)], entry, fallback, l, layers)
        layers.append(entry)
        return LayerNorms(job.upper, work, torch.ones(batch, dtype=torch.bool, device=g.device), job.deterministic)

    return solve


@dataclass
class _ProofJob:
    """One layer's batch in the exact solver: its masked operator and the bounds found so far."""

    op: AffineLayer
    col_mask: Optional[Tensor]
    row_mask: Tensor
    g: Tensor  # [B] the layer's guaranteed global norm
    upper: Tensor  # [B] the bound used (starts at g)
    deterministic: Tensor  # [B]
    proven: Optional[Tensor] = None  # [B] a Cholesky proof succeeded

    def pick(self, m: Optional[Tensor], rows: Tensor) -> Optional[Tensor]:
        return None if m is None else (m if m.shape[0] == 1 else m[rows])

    def proven_at(self, idx: Tensor) -> Tensor:
        return self.proven[idx]


def _prove(job: _ProofJob, start: Tensor, idx: Tensor, entry: LayerRecord, s) -> int:
    """Exact bounds (in place into ``job.upper``) of the samples ``idx``: a converged estimate places the
    Cholesky proof; unproven samples keep the global norm. Returns the estimate's work."""
    from .krylov import choose_side
    from .spectral import restarted_lanczos_norm

    side = choose_side(job.op)
    entry.side = side
    cm, rm = job.pick(job.col_mask, idx), job.pick(job.row_mask, idx)
    est = restarted_lanczos_norm(job.op, cm, rm, start[idx], max_applications=s.max_iter, tol=s.tol,
                                 work_dtype=s.work_dtype)
    bound, proven = exact_masked_norms(job.op, cm, rm, est.sigma.detach(), side, s.exact_max_entries,
                                       s.exact_max_flops)
    gi = job.g[idx]
    job.upper[idx] = torch.where(proven, torch.minimum(bound.to(job.g.dtype), gi), gi)
    job.proven = torch.zeros_like(job.deterministic)
    job.proven[idx] = proven
    entry.proven += int(proven.sum())
    entry.global_fallback += int((~proven).sum())
    return est.iterations


def _fall_back(job: _ProofJob, start: Tensor, open_: Tensor, entry: LayerRecord, fallback, l: int,
               layers: list) -> None:
    """The probabilistic bound (``fallback``) for the samples ``open_`` no proof covered."""
    if not open_.numel():
        return
    before = len(layers)
    prob = fallback(l, job.op, job.pick(job.col_mask, open_), job.pick(job.row_mask, open_), start[open_])
    entry.probabilistic = layers[before:]  # what the fallback rests on
    del layers[before:]
    job.upper[open_] = prob.sigma
    job.deterministic[open_] = prob.deterministic
    entry.global_fallback -= int(open_.numel()) - int((prob.sigma >= job.g[open_]).sum())
    entry.probabilistic_fallback = int((~prob.deterministic).sum())
