"""Spectral norms of masked layer operators, batched over samples.

Both solvers here approach ||A_b||_2 from *below* (a Rayleigh quotient of some
vector): ``power_iteration_norm`` and ``restarted_lanczos_norm`` (thick-restarted
Lanczos to a tolerance). Plain Lanczos for a fixed number of steps, the one the
probabilistic certificate inflates, is ``krylov.lanczos_norm``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layers.base import AffineLayer
from .masked import _batch_norm, _in_dtype, _masked_linear, _masked_transpose, _normalize

Tensor = torch.Tensor


@dataclass
class NormEstimate:
    sigma: Tensor  # [B] ||A v|| at the final v (differentiable w.r.t. the weights when grad is on)
    vector: Tensor  # [B, *in_shape] final right singular vector estimate (detached)
    iterations: int  # power iterations, or applications of A^T A (restarted Lanczos)
    converged: Tensor  # [B] bool


def power_iteration_norm(op: AffineLayer, col_mask: Optional[Tensor], row_mask: Optional[Tensor],
                         v0: Tensor, *, iterations: int, tol: float = 0.0,
                         work_dtype: Optional[torch.dtype] = None) -> NormEstimate:
    """Spectral norm of ``A_b = diag(row_mask_b) W diag(col_mask_b)`` for every sample b.

    Batched power iteration on A^T A from ``v0`` (warm start or random); a sample
    stops once the residual ||A^T A v - rho v|| of its Rayleigh quotient rho is at
    most ``tol * rho``, and only the others keep iterating. ``tol=0`` runs exactly
    ``iterations`` iterations. The
    estimate approaches ||A_b|| from below. The returned sigma is recomputed
    with gradient through W (v detached), i.e. d sigma / dW = u v^T.
    ``work_dtype`` (e.g. float32 for a float64 model) runs the iterations in a
    cheaper dtype; sigma is still evaluated in the model's dtype at the final v,
    so it stays a Rayleigh-quotient estimate from below (vector error enters it
    only quadratically).
    """
    batch = v0.shape[0]
    full_op, full_col, full_row = op, col_mask, row_mask
    op, v0, col_mask, row_mask = _in_dtype(work_dtype, op, v0, col_mask, row_mask)

    with torch.no_grad():
        v = _normalize(v0 if col_mask is None else v0 * col_mask)
        sigma = torch.zeros(batch, dtype=v.dtype, device=v.device)
        converged = torch.zeros(batch, dtype=torch.bool, device=v.device)
        active = torch.arange(batch, device=v.device)
        iters = 0
        for iters in range(1, iterations + 1):
            if tol <= 0:  # fixed iteration count: no bookkeeping of converged samples
                u = _masked_linear(op, v, col_mask, row_mask)
                sigma = _batch_norm(u)
                v = _normalize(_masked_transpose(op, u, col_mask))
                continue
            cm = None if col_mask is None else (col_mask if col_mask.shape[0] == 1 else col_mask[active])
            rm = None if row_mask is None else (row_mask if row_mask.shape[0] == 1 else row_mask[active])
            va = v[active]
            u = _masked_linear(op, va, cm, rm)
            w = _masked_transpose(op, u, cm)  # A^T A v
            rho = (w * va).flatten(1).sum(1)  # Rayleigh quotient, <= ||A||^2
            residual = (w - rho.view(-1, *([1] * (w.dim() - 1))) * va).flatten(1).norm(dim=1)
            v[active] = _normalize(w)
            # Residual test (not "small change"): a stalled iterate on a clustered spectrum
            # still has a large residual, so it is not declared converged.
            done = residual <= tol * rho.clamp_min(0)
            sigma[active] = _batch_norm(u)
            converged[active[done]] = True
            active = active[~done]
            if active.numel() == 0:
                break
        if tol <= 0:
            converged[:] = True
    # Re-normalise in the model's dtype: a float32 unit vector is not unit in float64, and
    # ||A v|| with ||v|| slightly > 1 could exceed ||A||.
    v = _normalize(v.detach().to(full_op.dtype))
    sigma = _batch_norm(_masked_linear(full_op, v, full_col, full_row))
    return NormEstimate(sigma, v, iters, converged)


def restarted_lanczos_norm(op: AffineLayer, col_mask: Optional[Tensor], row_mask: Optional[Tensor],
                           v0: Tensor, *, max_applications: int, tol: float, krylov: int = 16, keep: int = 4,
                           check_every: int = 4, work_dtype: Optional[torch.dtype] = None) -> NormEstimate:
    """Same quantity as ``power_iteration_norm``, by thick-restarted Lanczos on A^T A (batched).

    Each cycle extends an orthonormal basis Q (full reorthogonalisation) to
    ``krylov`` vectors and takes the top eigenpair of the projected matrix
    H = Q^T A^T A Q (Rayleigh-Ritz). Like a power iteration this approaches
    ||A_b||^2 from below, but it converges with the square root of the spectral
    gap instead of the gap. A sample stops once the residual of its top Ritz
    pair, ||B y - theta y|| = beta |s_last| with B = A^T A, is at most
    ``tol * theta`` (tested every ``check_every`` steps and at cycle ends). An
    unconverged sample restarts from its ``keep`` top Ritz vectors plus the
    next Lanczos vector (thick restart: a clustered top of the spectrum is not
    thrown away at every restart). ``max_applications`` caps the applications of
    A^T A. sigma is finally recomputed as ||A y|| at the top Ritz vector y in the
    model's dtype, with gradient through W.
    """
    if tol <= 0:
        raise ValueError("Lanczos needs a convergence tolerance > 0")
    if not 0 <= keep < krylov - 1:
        raise ValueError(f"keep must be in [0, krylov - 1), got keep={keep}, krylov={krylov}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    batch = v0.shape[0]
    full_op, full_col, full_row = op, col_mask, row_mask
    op, v0, col_mask, row_mask = _in_dtype(work_dtype, op, v0, col_mask, row_mask)
    with torch.no_grad():
        v = _normalize(v0 if col_mask is None else v0 * col_mask).flatten(1).clone()
        converged = torch.zeros(batch, dtype=torch.bool, device=v.device)
        active = torch.arange(batch, device=v.device)
        used = 0
        # State carried into the next cycle (for the samples in ``active``): the start vector
        # and, after a thick restart, the kept Ritz vectors and their Ritz values.
        kept_vecs: Optional[Tensor] = None
        kept_vals: Optional[Tensor] = None
        nxt = v
        # One basis buffer for all cycles (a fresh one per cycle costs page faults): a cycle
        # uses its first n_act rows, and slot j is always written before it is read.
        buffer = v.new_empty(batch, min(krylov, max_applications + keep), v.shape[1])
        while active.numel() and used < max_applications:
            p = 0 if kept_vecs is None else kept_vecs.shape[1]
            steps = min(krylov, p + max_applications - used)
            cyc = _lanczos_cycle(op, _pick(col_mask, active), _pick(row_mask, active), buffer[:active.numel(), :steps],
                                 kept_vecs, kept_vals, nxt, tol, check_every)
            used += cyc.applications
            # Ritz vectors: top one for the result, the ``top`` largest for a thick restart.
            m = cyc.m
            ritz = torch.bmm(cyc.final_s[:, None, :m].to(v.dtype), cyc.basis[:, :m]).squeeze(1)
            v[active] = _normalize(ritz)
            converged[active[~cyc.live]] = True
            restart = cyc.live
            active = active[restart]
            top = min(keep, m - 1)
            if not active.numel() or top == 0:
                kept_vecs = kept_vals = None
                nxt = v[active]
                continue
            # Thick restart: the ``top`` leading Ritz vectors of the final H (its eigenpairs
            # are those of the last step) and the next Lanczos vector w / beta, which is
            # orthogonal to all of them.
            S = cyc.evecs[:, :, -top:].transpose(1, 2).to(v.dtype)  # [n, top, m]
            kept_vecs = torch.bmm(S, cyc.basis[:, :m])[restart]
            kept_vals = cyc.evals[restart][:, -top:]
            nxt = cyc.w[restart] / cyc.safe[restart].unsqueeze(1)
        _verify_converged(op, col_mask, row_mask, v, converged, tol)
    v = _normalize(v.view(batch, *op.in_shape).to(full_op.dtype))
    sigma = _batch_norm(_masked_linear(full_op, v, full_col, full_row))
    return NormEstimate(sigma, v, used, converged)


def _pick(mask: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
    return None if mask is None else (mask if mask.shape[0] == 1 else mask[idx])


def _gram(op: AffineLayer, v: Tensor, cm: Optional[Tensor], rm: Optional[Tensor]) -> Tensor:
    """A^T A v for flattened v."""
    return _masked_transpose(op, _masked_linear(op, v.view(v.shape[0], *op.in_shape), cm, rm), cm).flatten(1)


@dataclass
class _Cycle:
    basis: Tensor  # [n, steps, d] orthonormal basis (first m columns valid)
    m: int  # columns used
    live: Tensor  # [n] bool: not converged (needs a restart)
    final_s: Tensor  # [n, steps] top Ritz vector coefficients of each sample's last test
    evals: Tensor
    evecs: Tensor  # eigenpairs of the final projected matrix
    w: Tensor  # next (unnormalised) Lanczos vector
    safe: Tensor  # its norm (1 where 0)
    applications: int


def _lanczos_cycle(op: AffineLayer, cm, rm, basis: Tensor, kept_vecs, kept_vals, nxt: Tensor, tol: float,
                   check_every: int) -> _Cycle:
    """One cycle of thick-restarted Lanczos for the active samples (see ``restarted_lanczos_norm``)."""
    n_act, steps = basis.shape[0], basis.shape[1]
    p = 0 if kept_vecs is None else kept_vecs.shape[1]
    H = basis.new_zeros(n_act, steps, steps, dtype=torch.float64)  # projected matrix Q^T B Q
    if p:
        basis[:, :p] = kept_vecs
        H[:, range(p), range(p)] = kept_vals
    basis[:, p] = nxt
    live = torch.ones(n_act, dtype=torch.bool, device=basis.device)  # not yet converged
    # Top Ritz pair of each sample, recorded at every convergence test while it is live
    # (every cycle ends with a test, so all samples get one).
    final_s = torch.zeros(n_act, steps, dtype=torch.float64, device=basis.device)
    breakdown_rel = 100 * torch.finfo(basis.dtype).eps
    applications = 0
    for j in range(p, steps):
        w = _gram(op, basis[:, j], cm, rm)
        applications += 1
        gram_norm = w.norm(dim=1)
        w, coef = _reorthogonalise(w, basis[:, :j + 1])
        beta = w.norm(dim=1) * live  # converged samples extend with zeros (see below)
        safe = torch.where(beta > 0, beta, torch.ones_like(beta))
        H[:, :j + 1, j] = coef.squeeze(1).double()
        # Breakdown: B q lies in span(Q) to working precision, so span(Q) is invariant
        # and w is rounding noise that no Gram-Schmidt pass makes orthogonal; such a
        # sample stops here (its Ritz values are exact for the invariant subspace).
        breakdown = live & (beta <= breakdown_rel * gram_norm)
        # The eigensolve of H costs more than the rest of a step: the convergence test
        # runs every ``check_every`` steps, at the end of a cycle and at a breakdown (a
        # sample may take up to check_every - 1 extra steps, which only refine its pair).
        if (j - p) % check_every == check_every - 1 or j == steps - 1 or bool(breakdown.any()):
            # eigh reads the upper triangle: exactly the computed columns.
            evals, evecs = torch.linalg.eigh(H[:, :j + 1, :j + 1], UPLO="U")
            theta_j = evals[:, -1].clamp_min(0)
            s_j = evecs[:, :, -1]
            residual = beta.double() * s_j[:, -1].abs()
            # Converged samples keep their Ritz pair: their later basis vectors are
            # zeros, so they never take in noise from an exhausted Krylov space.
            final_s[live, :j + 1] = s_j[live]
            live = live & ~((residual <= tol * theta_j) | breakdown)
            if not bool(live.any()) or j == steps - 1:
                break
        basis[:, j + 1] = w * (live / safe).unsqueeze(1)
    return _Cycle(basis, j + 1, live, final_s, evals, evecs, w, safe, applications)


def _reorthogonalise(w: Tensor, Q: Tensor):
    """w minus its components in span(Q), two classical Gram-Schmidt passes (CGS2), and Q^T w.

    The Ritz values are bounded by ||A||^2 only while Q stays orthonormal. The summed
    coefficients are column j of H. Row-vector products (w^T Q^T, then c Q) read the basis
    in memory order: ~4x faster on CPU than Q^T (Q w).
    """
    coef = None
    for _ in range(2):
        c = torch.bmm(w.unsqueeze(1), Q.transpose(1, 2))
        w = w - torch.bmm(c, Q).squeeze(1)
        coef = c if coef is None else coef + c
    return w, coef


def _verify_converged(op: AffineLayer, col_mask, row_mask, v: Tensor, converged: Tensor, tol: float) -> None:
    """Recheck "converged" from the explicit residual of the final pair (in place).

    The Krylov relation can be optimistic under rounding, so the claim is checked, up to
    what the work dtype can resolve.
    """
    if not bool(converged.any()):
        return
    idx = converged.nonzero().squeeze(1)
    y = _normalize(v[idx])
    by = _gram(op, y, _pick(col_mask, idx), _pick(row_mask, idx))
    rho = (by * y).sum(1)
    true_residual = (by - rho[:, None] * y).norm(dim=1)
    slack = max(2 * tol, 1e3 * torch.finfo(v.dtype).eps)
    converged[idx] = true_residual <= slack * rho.clamp_min(0)
