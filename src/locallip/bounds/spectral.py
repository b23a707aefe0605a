"""Spectral norms of masked layer operators, batched over samples.

Every solver here approaches ||A_b||_2 from *below* (a Rayleigh quotient of some
vector): power iteration, thick-restarted Lanczos to a tolerance, and plain
Lanczos for a fixed number of steps (the one the probabilistic certificate
inflates, see ``guarantees``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .operators import AffineOp, _batch_norm, _in_dtype, _masked_linear, _masked_transpose, _normalize

Tensor = torch.Tensor


@dataclass
class PowerIterationResult:
    sigma: Tensor  # [B] ||A v|| at the final v (differentiable w.r.t. the weights when grad is on)
    vector: Tensor  # [B, *in_shape] final right singular vector estimate (detached)
    iterations: int
    converged: Tensor  # [B] bool


def masked_operator_norm(op: AffineOp, col_mask: Optional[Tensor], row_mask: Optional[Tensor],
                         v0: Tensor, *, max_iter: int, tol: float = 0.0,
                         work_dtype: Optional[torch.dtype] = None) -> PowerIterationResult:
    """Spectral norm of ``A_b = diag(row_mask_b) W diag(col_mask_b)`` for every sample b.

    Batched power iteration on A^T A from ``v0`` (warm start or random); a sample
    stops once the residual ||A^T A v - rho v|| of its Rayleigh quotient rho is at
    most ``tol * rho``, and only the others keep iterating. ``tol=0`` runs exactly
    ``max_iter`` iterations. The
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
        for iters in range(1, max_iter + 1):
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
    v = _normalize(v.detach().to(full_op.weight.dtype))
    sigma = _batch_norm(_masked_linear(full_op, v, full_col, full_row))
    return PowerIterationResult(sigma, v, iters, converged)


def masked_operator_norm_lanczos(op: AffineOp, col_mask: Optional[Tensor], row_mask: Optional[Tensor],
                                 v0: Tensor, *, max_iter: int, tol: float, krylov: int = 16, keep: int = 4,
                                 check_every: int = 4, work_dtype: Optional[torch.dtype] = None) -> PowerIterationResult:
    """Same quantity as ``masked_operator_norm``, by thick-restarted Lanczos on A^T A (batched).

    Each cycle extends an orthonormal basis Q (full reorthogonalisation) to
    ``krylov`` vectors and takes the top eigenpair of the projected matrix
    H = Q^T A^T A Q (Rayleigh-Ritz). Like a power iteration this approaches
    ||A_b||^2 from below, but it converges with the square root of the spectral
    gap instead of the gap. A sample stops once the residual of its top Ritz
    pair, ||B y - theta y|| = beta |s_last| with B = A^T A, is at most
    ``tol * theta`` (tested every ``check_every`` steps and at cycle ends). An
    unconverged sample restarts from its ``keep`` top Ritz vectors plus the
    next Lanczos vector (thick restart: a clustered top of the spectrum is not
    thrown away at every restart). ``max_iter`` caps the applications of A^T A.
    sigma is finally recomputed as ||A y|| at the top Ritz vector y in the
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

    def gram(v, cm, rm):  # A^T A v
        return _masked_transpose(op, _masked_linear(op, v, cm, rm), cm)

    def pick(mask, idx):
        return None if mask is None else (mask if mask.shape[0] == 1 else mask[idx])

    with torch.no_grad():
        v = _normalize(v0 if col_mask is None else v0 * col_mask).flatten(1).clone()
        converged = torch.zeros(batch, dtype=torch.bool, device=v.device)
        active = torch.arange(batch, device=v.device)
        used = 0
        shape = op.in_shape
        # State carried into the next cycle (for the samples in ``active``): the start vector
        # and, after a thick restart, the kept Ritz vectors and their Ritz values.
        kept_vecs: Optional[Tensor] = None
        kept_vals: Optional[Tensor] = None
        nxt = v
        # One basis buffer for all cycles (a fresh one per cycle costs page faults): a cycle
        # uses its first n_act rows, and slot j is always written before it is read.
        buffer = v.new_empty(batch, min(krylov, max_iter + keep), v.shape[1])
        breakdown_rel = 100 * torch.finfo(v.dtype).eps
        while active.numel() and used < max_iter:
            cm, rm = pick(col_mask, active), pick(row_mask, active)
            n_act = active.numel()
            p = 0 if kept_vecs is None else kept_vecs.shape[1]
            steps = min(krylov, p + max_iter - used)
            basis = buffer[:n_act, :steps]
            H = v.new_zeros(n_act, steps, steps, dtype=torch.float64)  # projected matrix Q^T B Q
            if p:
                basis[:, :p] = kept_vecs
                H[:, range(p), range(p)] = kept_vals
            basis[:, p] = nxt
            live = torch.ones(n_act, dtype=torch.bool, device=v.device)  # not yet converged
            # Top Ritz pair of each sample, recorded at every convergence test while it is live
            # (every cycle ends with a test, so all samples get one).
            final_s = torch.zeros(n_act, steps, dtype=torch.float64, device=v.device)
            for j in range(p, steps):
                q = basis[:, j]
                w = gram(q.view(n_act, *shape), cm, rm).flatten(1)
                used += 1
                # Full reorthogonalisation, two classical Gram-Schmidt passes (CGS2): the Ritz
                # values are bounded by ||A||^2 only while Q stays orthonormal. The summed
                # coefficients Q^T w are column j of H. Row-vector products (w^T Q^T, then
                # c Q) read the basis in memory order: ~4x faster on CPU than Q^T (Q w).
                Q = basis[:, :j + 1]
                gram_norm = w.norm(dim=1)
                coef = None
                for _ in range(2):
                    c = torch.bmm(w.unsqueeze(1), Q.transpose(1, 2))
                    w = w - torch.bmm(c, Q).squeeze(1)
                    coef = c if coef is None else coef + c
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
            m = j + 1
            done = ~live
            top = min(keep, m - 1)
            # Ritz vectors: top one for the result, the ``top`` largest for a thick restart.
            ritz = torch.bmm(final_s[:, None, :m].to(v.dtype), basis[:, :m]).squeeze(1)
            v[active] = _normalize(ritz)
            converged[active[done]] = True
            restart = ~done
            active = active[restart]
            if not active.numel() or top == 0:
                kept_vecs = kept_vals = None
                nxt = v[active]
                continue
            # Thick restart: the ``top`` leading Ritz vectors of the final H (its eigenpairs
            # are those of the last step) and the next Lanczos vector w / beta, which is
            # orthogonal to all of them.
            S = evecs[:, :, -top:].transpose(1, 2).to(v.dtype)  # [n, top, m]
            kept_vecs = torch.bmm(S, basis[:, :m])[restart]
            kept_vals = evals[restart][:, -top:]
            nxt = w[restart] / safe[restart].unsqueeze(1)
        # "Converged" is checked, not inferred from the Krylov relation (which rounding can
        # make optimistic): the explicit residual of the final pair must meet the tolerance,
        # up to what the work dtype can resolve.
        if bool(converged.any()):
            idx = converged.nonzero().squeeze(1)
            y = _normalize(v[idx])
            by = gram(y.view(-1, *shape), pick(col_mask, idx), pick(row_mask, idx)).flatten(1)
            rho = (by * y).sum(1)
            true_residual = (by - rho[:, None] * y).norm(dim=1)
            slack = max(2 * tol, 1e3 * torch.finfo(v.dtype).eps)
            converged[idx] = true_residual <= slack * rho.clamp_min(0)
    v = _normalize(v.view(batch, *op.in_shape).to(full_op.weight.dtype))
    sigma = _batch_norm(_masked_linear(full_op, v, full_col, full_row))
    return PowerIterationResult(sigma, v, used, converged)
