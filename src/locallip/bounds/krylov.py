"""Plain Lanczos for a fixed number of steps, and what it guarantees with a random start.

For a masked layer operator A = diag(row) W diag(col) (per sample), ``k`` steps of
Lanczos on the Gram matrix of its smaller side (A^T A on the active inputs, or
A A^T on the active outputs: the same nonzero spectrum) give the top Ritz value
theta_k, the largest Rayleigh quotient over the Krylov space K_k(B, b).

Kuczynski & Wozniakowski (SIAM J. Matrix Anal. Appl. 13(4), 1992, Theorem 4.2):
for B symmetric positive semidefinite of order n and a start b uniform on the
unit sphere, P(theta_k < (1 - e) lambda_max(B)) <= 1.648 sqrt(n) exp(-sqrt(e) (2k - 1)).
So with e = (ln(1.648 sqrt(n) / delta) / (2k - 1))^2 (``lanczos_inflation``),
sigma_hat / sqrt(1 - e) >= ||A|| with probability >= 1 - delta, where
sigma_hat^2 is the Rayleigh quotient of the top Ritz vector. When the Krylov
space reaches the whole active space (k >= n) theta is lambda_max itself (the
start has a nonzero component along the top eigenvector with probability 1), so
e = 0.

The theorem is about exact arithmetic. Full reorthogonalisation keeps the
computed basis orthonormal to working precision, so the computed Ritz pair is
that of exact Lanczos on a matrix within a small multiple of u ||B|| of B
(u: unit roundoff of the work dtype; the first-order backward error of k steps
is about k sqrt(n) u relative). ``FP_MARGIN_FACTOR`` turns that into a relative
margin 4 k sqrt(n) u on sigma (8x the first-order estimate), added on top. It is
a margin, not a proof: ``exact`` is the level with a proof. sigma_hat itself is evaluated in
the model's dtype at the Ritz vector.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from .layers.base import AffineLayer
from .masked import _batch_norm, _in_dtype, _masked_linear, _masked_transpose, _normalize
from .records import LayerRecord
from .solvers import LayerNorms

Tensor = torch.Tensor

KW_CONSTANT = 1.648  # Kuczynski-Wozniakowski (1992), Lanczos with a random start
FP_MARGIN_FACTOR = 4.0  # relative floating-point margin = FP_MARGIN_FACTOR * k * sqrt(n) * u


def lanczos_inflation(n: int, steps: int, delta: float) -> float:
    """e such that P(theta_k < (1 - e) lambda_max) <= delta for k Lanczos steps on order n (0 when k >= n).

    Returns 1.0 (no usable bound) when e would reach 1.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    if steps < 1 or n < 1:
        raise ValueError(f"need steps >= 1 and n >= 1, got steps={steps}, n={n}")
    if steps >= n:
        return 0.0
    root = math.log(KW_CONSTANT * math.sqrt(n) / delta) / (2 * steps - 1)
    return 1.0 if root >= 1 else root * root


def steps_for_inflation(n: int, delta: float, inflation: float) -> int:
    """Smallest k whose norm inflation 1/sqrt(1 - e) - 1 is at most ``inflation`` for order n."""
    if not inflation > 0:
        raise ValueError(f"inflation must be > 0, got {inflation!r}")
    e = 1.0 - 1.0 / (1.0 + inflation) ** 2
    k = math.ceil((math.log(KW_CONSTANT * math.sqrt(n) / delta) / math.sqrt(e) + 1) / 2)
    return max(1, min(k, n))


def fp_margin(n: int, steps: int, dtype: torch.dtype) -> float:
    """Relative margin on sigma for rounding in ``steps`` Lanczos steps of order n in ``dtype``."""
    return FP_MARGIN_FACTOR * steps * math.sqrt(max(n, 1)) * torch.finfo(dtype).eps / 2


@dataclass
class KrylovResult:
    sigma: Tensor  # [B] Rayleigh quotient value ||A y|| (or ||A^T y||) at the top Ritz vector, model dtype
    vector: Tensor  # [B, *space] top Ritz vector (unit, detached), in the space of ``side``
    ritz_value: Tensor  # [B] top eigenvalue of the tridiagonal matrix (float64)
    dims: Tensor  # [B] n: active coordinates of the space iterated in
    steps: Tensor  # [B] Lanczos steps taken per sample (< requested at a breakdown or when n is reached)
    side: str  # "input" (A^T A) or "output" (A A^T)


def _top_eigenpairs(alpha: Tensor, beta: Tensor):
    """Largest eigenvalue and its unit eigenvector of each symmetric tridiagonal matrix (float64).

    Small matrices (a few steps) in one batched dense eigensolve; larger ones by LAPACK's
    bisection + inverse iteration for the one wanted pair (scipy), much cheaper than a full
    eigendecomposition. A matrix with a NaN or inf entry (weights that diverged) gets NaN, so
    that whatever is built on it is NaN too and is caught as such.
    """
    batch, m = alpha.shape
    vals = torch.zeros(batch, dtype=torch.float64)
    vecs = torch.zeros(batch, max(m, 1), dtype=torch.float64)
    a, b = alpha.detach().double().cpu(), beta.detach().double().cpu()
    finite = torch.isfinite(a).all(1) & torch.isfinite(b).all(1)
    vals[~finite], vecs[~finite] = float("nan"), float("nan")
    rows = finite.nonzero().squeeze(1)
    if m <= 1:  # no step taken (an empty space) or a 1x1 matrix
        vals[rows] = a[rows, 0] if m else 0.0
        vecs[rows, 0] = 1.0
    elif m <= SMALL_TRIDIAGONAL and rows.numel():
        t = torch.diag_embed(a[rows]) + torch.diag_embed(b[rows], 1) + torch.diag_embed(b[rows], -1)
        w, v = torch.linalg.eigh(t)
        vals[rows], vecs[rows] = w[:, -1], v[:, :, -1]
    else:
        from scipy.linalg import eigh_tridiagonal

        an, bn = a.numpy(), b.numpy()
        for i in rows.tolist():
            w, v = eigh_tridiagonal(an[i], bn[i], select="i", select_range=(m - 1, m - 1), check_finite=False)
            vals[i] = float(w[0])
            vecs[i] = torch.from_numpy(v[:, 0])
    return torch.where(torch.isnan(vals), vals, vals.clamp_min(0)).to(alpha.device), vecs.to(alpha.device)


#: Tridiagonal matrices up to this order are solved by one batched dense eigensolve.
SMALL_TRIDIAGONAL = 32


def choose_side(op: AffineLayer) -> str:
    """Iterate on the smaller of A^T A (input space) and A A^T (output space)."""
    n_in = math.prod(op.in_shape)
    n_out = math.prod(op.out_shape)
    return "output" if n_out < n_in else "input"


def lanczos_norm(op: AffineLayer, col_mask: Optional[Tensor], row_mask: Optional[Tensor], start: Tensor, *,
                 steps: int, side: str = "input", work_dtype: Optional[torch.dtype] = None) -> KrylovResult:
    """``steps`` steps of plain Lanczos with full reorthogonalisation on the Gram matrix of one side.

    side="input": B = A^T A on the active inputs, ``start`` shaped like the layer input;
    side="output": B = A A^T on the active outputs, ``start`` shaped like the layer output.
    No restarts and no tolerance: theta_k is the top Ritz value of K_k(B, start).
    Each step is the three-term recurrence followed by one classical Gram-Schmidt
    pass against the whole basis (the recurrence has already removed the large
    components, so one pass leaves the basis orthonormal to working precision).
    A sample whose space becomes invariant (breakdown) stops extending; a sample whose
    mask leaves nothing active takes no step and gets sigma 0 (a constant map).

    sigma is recomputed at the top Ritz vector in the model's dtype with gradient
    through W (vector detached): a Rayleigh-quotient value, never above ||A||.
    """
    if steps < 1:
        raise ValueError(f"Krylov steps must be >= 1, got {steps}")
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', got {side!r}")
    full_op, full_col, full_row = op, col_mask, row_mask
    op, start, col_mask, row_mask = _in_dtype(work_dtype, op, start, col_mask, row_mask)
    shape = tuple(op.in_shape if side == "input" else op.out_shape)
    space_mask = col_mask if side == "input" else row_mask
    with torch.no_grad():
        batch = start.shape[0]
        if space_mask is None:
            dims = torch.full((batch,), math.prod(shape), dtype=torch.long, device=start.device)
        else:
            dims = space_mask.flatten(1).sum(1).round().long().expand(batch).clone()
        q = _normalize(start if space_mask is None else start * space_mask).flatten(1)
        basis, alpha, beta, taken = _lanczos_steps(_gram_of_side(op, side, col_mask, row_mask, shape), q,
                                                   max(1, min(steps, math.prod(shape))))
        m = int(taken.max())
        ritz_value, s_top = _top_eigenpairs(alpha[:, :m], beta[:, :max(m - 1, 0)])
        y = torch.bmm(s_top[:, None, :m].to(q.dtype), basis[:, :m]).squeeze(1) if m else torch.zeros_like(q)
    y = _normalize(y.view(batch, *shape).to(full_op.dtype))
    if side == "input":
        sigma = _batch_norm(_masked_linear(full_op, y, full_col, full_row))
    else:
        u = y if full_row is None else y * full_row
        sigma = _batch_norm(_masked_transpose(full_op, u, full_col))
    return KrylovResult(sigma, y, ritz_value, dims, taken, side)


def _gram_of_side(op: AffineLayer, side: str, col_mask: Optional[Tensor], row_mask: Optional[Tensor], shape):
    """q -> B q (flattened) for B = A^T A (side "input") or A A^T (side "output")."""
    def gram(q: Tensor) -> Tensor:
        # q is already zero outside the side's mask (the start is masked and every step ends
        # with that mask), so each mask is applied once per product.
        q = q.view(q.shape[0], *shape)
        if side == "input":
            out = op.linear(q)
            if row_mask is not None:
                out = out.mul_(row_mask)
            out = op.transpose(out)
            return (out if col_mask is None else out.mul_(col_mask)).flatten(1)
        out = op.transpose(q)
        if col_mask is not None:
            out = out.mul_(col_mask)
        out = op.linear(out)
        return (out if row_mask is None else out.mul_(row_mask)).flatten(1)
    return gram


def _lanczos_steps(gram, q: Tensor, k: int):
    """Up to ``k`` Lanczos steps from the unit rows of ``q``: (basis, alpha, beta, steps taken)."""
    batch = q.shape[0]
    basis = q.new_empty(batch, k, q.shape[1])
    basis[:, 0] = q
    alpha = torch.zeros(batch, k, dtype=torch.float64, device=q.device)
    beta = torch.zeros(batch, k, dtype=torch.float64, device=q.device)
    live = _batch_norm(q) > 0  # an empty mask leaves nothing to iterate on
    taken = torch.zeros(batch, dtype=torch.long, device=q.device)
    if not bool(live.any()):
        return basis, alpha, beta, taken
    breakdown_rel = 100 * torch.finfo(q.dtype).eps
    prev_beta = torch.zeros(batch, 1, dtype=q.dtype, device=q.device)
    for j in range(k):
        qj = basis[:, j]
        w = gram(qj)
        gram_norm = w.norm(dim=1)
        a = torch.linalg.vecdot(w, qj).unsqueeze(1)
        w.addcmul_(a, qj, value=-1)  # three-term recurrence
        if j:
            w.addcmul_(prev_beta, basis[:, j - 1], value=-1)
        # One classical Gram-Schmidt pass against the whole basis (row-vector products read
        # the basis in memory order); it also corrects alpha by the q_j coefficient.
        Q = basis[:, :j + 1]
        c = torch.bmm(w.unsqueeze(1), Q.transpose(1, 2))
        w.sub_(torch.bmm(c, Q).squeeze(1))
        alpha[:, j] = ((a.squeeze(1) + c[:, 0, j]) * live).double()
        taken += live.long()
        if j + 1 == k:
            break
        b = w.norm(dim=1)
        live &= b > breakdown_rel * gram_norm  # breakdown: the Krylov space is invariant
        if not bool(live.any()):
            break
        b = b * live
        beta[:, j] = b.double()
        prev_beta = b.unsqueeze(1)
        scale = live / torch.where(b > 0, b, torch.ones_like(b))
        torch.mul(w, scale.unsqueeze(1), out=basis[:, j + 1])
    return basis, alpha, beta, taken


def _empty(mask: Optional[Tensor], batch: int, device) -> Tensor:
    """[batch] bool: the 0/1 mask has no active entry (None: all active)."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    return (mask.flatten(1).sum(1) == 0).expand(batch)


def probabilistic_layer_solver(global_norms: Tensor, delta_layer: float, inflation: float, steps: Optional[int],
                               generator: Optional[torch.Generator], work_dtype: Optional[torch.dtype],
                               layers: List[dict]):
    """Per-layer solver of the probabilistic level: inflated Lanczos, capped by the global norm.

    ``solve(l, op, col_mask, row_mask, v0)`` (v0 unused: the start is drawn from ``generator``,
    independent of the model) returns the layer's ``LayerNorms``; what each layer rests on is
    appended to ``layers``.
    """

    def solve(l, op, col_mask, row_mask, v0):
        batch = row_mask.shape[0] if col_mask is None else max(row_mask.shape[0], col_mask.shape[0])
        dtype, device = global_norms.dtype, row_mask.device
        side = choose_side(op)
        shape = tuple(op.in_shape if side == "input" else op.out_shape)
        n_max = math.prod(shape)
        k = steps if steps is not None else steps_for_inflation(n_max, delta_layer, inflation)
        start = torch.randn((batch,) + shape, generator=generator, dtype=dtype,
                            device="cpu" if generator is None else generator.device).to(device)
        res = lanczos_norm(op, col_mask, row_mask, start, steps=k, side=side, work_dtype=work_dtype)
        wd = work_dtype or dtype
        e = torch.tensor([lanczos_inflation(int(n), int(t), delta_layer) if int(n) > 0 and int(t) > 0 else 0.0
                          for n, t in zip(res.dims.tolist(), res.steps.tolist())], dtype=torch.float64)
        margin = torch.tensor([fp_margin(int(n), max(int(t), 1), wd) for n, t in
                               zip(res.dims.tolist(), res.steps.tolist())], dtype=torch.float64)
        usable = e < 1
        factor = (1 + margin) / torch.sqrt(torch.where(usable, 1 - e, torch.ones_like(e)))
        g = global_norms[l].expand(batch)
        upper = res.sigma.detach() * factor.to(dtype).to(device)
        upper = torch.where(usable.to(device), upper, g)
        upper = torch.minimum(upper, g)
        # A mask that removes every row or every column leaves the zero operator (a dead layer:
        # the map is constant on the ball): its norm is 0, exactly, whatever the Krylov space saw.
        zero = _empty(row_mask, batch, device) | _empty(col_mask, batch, device)
        upper = torch.where(zero, torch.zeros_like(upper), upper)
        layers.append(LayerRecord(side=side, steps=int(k), n_max=int(n_max),
                                  inflation_max=float((factor[usable] - 1).max()) if bool(usable.any()) else None,
                                  inflation_median=float((factor[usable] - 1).median()) if bool(usable.any()) else None,
                                  fp_margin_max=float(margin.max()), global_fallback=int((~usable).sum())))
        # A dead layer (nothing active) is the constant map: its norm 0 is exact. Where the
        # global norm was used, the value is deterministic too.
        deterministic = zero | (upper >= g)
        return LayerNorms(upper, int(k), torch.ones(batch, dtype=torch.bool, device=device), deterministic)

    return solve
