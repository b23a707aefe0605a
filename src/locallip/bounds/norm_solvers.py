"""The per-layer norm solver of each level, built from ``NormSettings`` (``local_bound`` picks one).

A solver is ``solve(l, op, col_mask, row_mask, v0) -> LayerNorms`` for hidden layer l: the value
used for ||diag(row) W diag(col)|| per sample, and what it is (converged, deterministic).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .exact import exact_layer_solver
from .krylov import lanczos_norm, probabilistic_layer_solver
from .layers.base import batch_norm2
from .records import NormRecord
from .settings import NormSettings
from .solvers import LayerNorms, Solver
from .spectral import power_iteration_norm, restarted_lanczos_norm

Tensor = torch.Tensor


def sound_solver(s: NormSettings, global_norms: Tensor, delta_layer: float, generator: Optional[torch.Generator],
                 layers: list) -> Solver:
    """The per-layer solver of the probabilistic or the exact level (its fallback included)."""
    probabilistic = None
    if s.level == "probabilistic" or s.exact_fallback == "probabilistic":
        probabilistic = probabilistic_layer_solver(global_norms, delta_layer, s.inflation, s.steps, generator,
                                                   s.work_dtype, layers)
    if s.level == "probabilistic":
        return probabilistic
    return exact_layer_solver(global_norms, s, layers, probabilistic)


def global_norm_solver(norms: Tensor, batch: int, device) -> Solver:
    """Every layer's guaranteed global norm for every sample (the box step): deterministic."""
    def solve(l, op, col_mask, row_mask, v0):
        ones = torch.ones(batch, dtype=torch.bool, device=device)
        return LayerNorms(norms[l].expand(batch), 0, ones, ones)
    return solve


def _run_estimate(s: NormSettings, steps: int, op, col_mask, row_mask, v0):
    """One estimate from below of the masked norms: (sigma, work, converged)."""
    if s.method == "krylov":
        res = lanczos_norm(op, col_mask, row_mask, v0, steps=steps, work_dtype=s.work_dtype)
        return res.sigma, int(res.steps.max()), torch.ones_like(res.steps, dtype=torch.bool)
    if s.method == "lanczos":
        res = restarted_lanczos_norm(op, col_mask, row_mask, v0, max_applications=s.max_iter, tol=s.tol,
                                     work_dtype=s.work_dtype)
    else:
        res = power_iteration_norm(op, col_mask, row_mask, v0, iterations=s.max_iter, tol=s.tol,
                                   work_dtype=s.work_dtype)
    return res.sigma, res.iterations, res.converged


def estimate_solver(s: NormSettings, record: NormRecord) -> Solver:
    """Solver of the estimate level (from below), optionally skipping layers whose masks change nothing."""
    steps = s.steps if s.steps is not None else s.max_iter
    solved: List[float] = []
    record.masked_fraction = solved  # per layer: share of the samples the masked solver ran for

    def solve(l, op, col_mask, row_mask, v0):
        batch = v0.shape[0]
        false = torch.zeros(batch, dtype=torch.bool, device=v0.device)
        if s.masked_norms == "always":
            sigma, work, ok = _run_estimate(s, steps, op, col_mask, row_mask, v0)
            solved.append(1.0)
            return LayerNorms(sigma, work, ok, false)
        # ||W v|| at the warm-start vector: the global norm estimate (differentiable through W).
        sigma_global = batch_norm2(op.linear(v0[:1]))[0]
        need = torch.zeros(batch, dtype=torch.bool, device=v0.device)
        sigma = sigma_global.expand(batch)
        if s.masked_norms == "adaptive":
            need, sigma = _adaptive_choice(s, op, col_mask, row_mask, v0, sigma_global, sigma)
        idx = need.nonzero().squeeze(1)
        solved.append(float(idx.numel()) / batch)
        ok = torch.ones(batch, dtype=torch.bool, device=v0.device)
        work = 0
        if idx.numel():
            pick = (lambda m: None if m is None else (m if m.shape[0] == 1 else m[idx]))
            sub, work, sub_ok = _run_estimate(s, steps, op, pick(col_mask), pick(row_mask), v0[idx])
            sigma = sigma.clone().index_put((idx,), sub)  # out of place: autograd sees both sources
            ok = ok.index_put((idx,), sub_ok)
        return LayerNorms(sigma, work, ok, false)

    return solve


def _adaptive_choice(s: NormSettings, op, col_mask, row_mask, v0, sigma_global, sigma):
    """The samples whose masks can change the norm by more than ``adaptive_tol`` (they get the masked
    solver), and the value the others take: the global estimate, or ||D W D' v|| / ||D' v||."""
    with torch.no_grad():
        u = v0 if col_mask is None else v0 * col_mask
        if s.adaptive_from_below:  # kept is the value taken: every sample's own product, as certified before
            kept = batch_norm2(op.linear(u) * row_mask)
        else:  # kept only decides: shared products where a sample's columns are all kept
            kept = _kept_norms(op, v0, u, col_mask, row_mask)
        need = kept < (1 - s.adaptive_tol) * sigma_global.detach()
        if s.adaptive_from_below:  # ||D W D' v|| / ||D' v||: a Rayleigh quotient, never above the masked norm
            un = batch_norm2(u)
            sigma = torch.where(un > 0, kept / torch.where(un > 0, un, torch.ones_like(un)), torch.zeros_like(kept))
    return need, sigma


def _kept_norms(op, v0, u, col_mask, row_mask) -> Tensor:
    """[B] ||D W D' v|| per sample (D, D': row and column masks), with W applied only to the samples whose
    column mask drops something when every sample starts from one vector (a warm start): the others share
    W v, computed once (the training step's adaptive decision is one full forward pass otherwise)."""
    batch = v0.shape[0]
    row = row_mask.expand(batch, *row_mask.shape[1:])
    if batch == 1 or v0.stride(0) != 0:  # one sample, or a start vector per sample: nothing is shared
        return batch_norm2(op.linear(u) * row)
    full = (torch.ones(batch, dtype=torch.bool, device=v0.device) if col_mask is None
            else (col_mask == 1).flatten(1).all(1).expand(batch))
    kept = batch_norm2(op.linear(v0[:1]) * row)
    rest = (~full).nonzero().squeeze(1)
    if rest.numel():
        kept[rest] = batch_norm2(op.linear(u[rest]) * row[rest])
    return kept
