"""Local (Local-Lip) Lipschitz bound of the penultimate features on B(x, eps), per sample.

On the ball, bound every pre-activation by IBP ∩ ball bounds, mark neurons whose
activation is constant there, and use ``prod_l ||M_l W_l O_{l-1}||_2`` (M_l / O_l:
0/1 masks of the inputs / outputs of act_l that can vary). Fixed neurons carry no
change, so this bounds the Lipschitz constant of h_{L-1} on the ball, and it is
never larger than the global K.

``box_bound`` is the same propagation with every layer's *guaranteed global* norm in
place of the masked one: deterministic, a few forward passes, and still tighter than
GloRo's certificate (the boxes and the ball ∩ box last layer are kept).

The network-level code here only iterates over the layer protocol's objects
(``bounds.layers``): each affine layer gives its own boxes, products and norms, each
activation its interval and masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
from torch import nn

from .clean import CleanPass, check_input, clean_pass
from .globalbound import global_bound
from .layers import AffineLayer, network_layers
from .layers.base import bcast
from .norm_solvers import estimate_solver, global_norm_solver, sound_solver
from .records import NormRecord
from .settings import LEVELS, MASKED_NORMS, NormSettings, as_batch_radius, settings_from
from .solvers import Solver
from .spectral import restarted_lanczos_norm

Tensor = torch.Tensor

#: The older name of ``LEVELS``.
GUARANTEE_LEVELS = LEVELS

__all__ = ["GUARANTEE_LEVELS", "LEVELS", "MASKED_NORMS", "CleanPass", "LocalBound", "NormSettings", "box_bound",
           "check_input", "clean_pass", "converged_layer_norms", "local_bound", "propagate"]


@dataclass
class LocalBound:
    lipschitz: Tensor  # [B] local Lipschitz bound of the penultimate features on B(x, eps)
    layer_norms: Tensor  # [B, L-1] masked operator norms
    feature_radius: Tensor  # [B] eps * lipschitz: how far the penultimate features can move
    features: Tensor  # [B, d] clean penultimate features (flattened)
    feature_lower: Tensor  # [B, d] box of the penultimate features on the ball
    feature_upper: Tensor
    feature_mask: Tensor  # [B, d] 1 where a penultimate feature can vary
    logits: Tensor  # [B, C] clean logits
    pre_bounds: List[Tuple[Tensor, Tensor]]  # (lb, ub) of every hidden pre-activation (IBP ∩ ball)
    masks: List[Tensor]  # output masks of every activation (1 = varying)
    iterations: List[int]  # solver work per layer (max over the batch): steps, iterations or applications
    converged: Tensor  # [B] bool, every layer's estimate converged (always True for the sound levels)
    level: str = "estimate"  # what the layer norms are: "probabilistic", "exact" or "estimate"
    row_masks: Optional[List[Tensor]] = None  # row mask of every hidden layer's masked operator
    record: NormRecord = field(default_factory=lambda: NormRecord("estimate"))  # what the level rests on
    input_shape: Tuple[int, ...] = ()  # per-sample input shape the bound was computed for
    # [B] bool: every layer norm of the sample is a deterministic upper bound (exact proof or the
    # guaranteed global norm); None for estimates.
    deterministic: Optional[Tensor] = None

    @property
    def radius(self) -> Tensor:
        """The older name of ``feature_radius``."""
        return self.feature_radius

    @property
    def guarantee(self) -> str:
        """The older name of ``level``."""
        return self.level

    @property
    def info(self) -> NormRecord:
        """The older name of ``record``."""
        return self.record

    def fixed_fraction(self) -> float:
        total = sum(m[0].numel() for m in self.masks) * self.masks[0].shape[0]
        varying = sum(float(m.sum()) for m in self.masks)
        return 1.0 - varying / max(total, 1)

    def fixed_fraction_per_layer(self) -> List[float]:
        """Fraction of each activation layer's outputs that are constant on the ball (batch mean)."""
        return [1.0 - float(m.sum()) / max(m.numel(), 1) for m in self.masks]

    def operator_masks(self) -> List[Tuple[Optional[Tensor], Tensor]]:
        """(column mask, row mask) of every hidden layer's masked operator, as the bound used them."""
        cols: List[Optional[Tensor]] = [None] + list(self.masks[:-1])
        return list(zip(cols, self.row_masks or self.masks))


def local_bound(model: nn.Sequential, x: Tensor, eps: Union[float, Tensor], settings: Optional[NormSettings] = None,
                *, generator: Optional[torch.Generator] = None, global_norms: Optional[Tensor] = None,
                start_vectors: Optional[List[Tensor]] = None, clean: Optional[CleanPass] = None,
                **options) -> LocalBound:
    """Local Lipschitz bound of the penultimate features on B(x, eps), per sample.

    ``settings`` (a ``NormSettings``, or keyword overrides of its fields) says how each masked
    layer norm is computed; its ``level`` (older keyword: ``guarantee``) says what it is:

    * "probabilistic" (default): an upper bound with probability >= 1 - delta / (L - 1) per
      layer (so >= 1 - delta per sample, union bound), from plain Lanczos with a random start
      (``generator``) inflated by the Kuczynski-Wozniakowski factor and a rounding margin
      (``bounds.krylov``). ``steps`` defaults to the fewest that keep the inflation at most
      ``inflation``. Where the inflation would be unbounded, the layer's guaranteed global norm.
    * "exact": a deterministic upper bound (explicit Gram matrix and a Cholesky proof,
      ``bounds.exact``). Where the layer exceeds the budget or no proof succeeds,
      ``exact_fallback`` decides: the layer's guaranteed global norm ("global") or the
      probabilistic bound above ("probabilistic"); ``deterministic`` says which samples
      are proven throughout. With ``exact_near_global`` > 0, a layer whose masked norm is
      already within that fraction of its global norm (by a quick estimate from below) takes
      the global norm without a proof.
    * "estimate": the value a solver converges to from below, no guarantee: ``method``
      "lanczos" (restarted, to ``tol``, at most ``max_iter`` operator applications),
      "power" (to ``tol``, or exactly ``max_iter`` iterations with tol 0) or "krylov"
      (exactly ``steps`` plain Lanczos steps; ``max_iter`` when ``steps`` is None).
      init="global" starts from the model's global singular vectors (training), or from
      ``start_vectors`` (one flattened vector per hidden layer) when given. At the exact level
      ``start_vectors`` warm-start the estimate that places the proof (the proof itself does
      not depend on the start); the probabilistic start is always drawn from ``generator``.
      ``masked_norms`` (training): "always" runs the solver for every sample and layer;
      "never" uses the global power-iteration norm ||W v|| (v: the warm-start vector,
      differentiable) instead, i.e. BCP's bound with the boxes kept; "adaptive" runs the
      solver only for the samples whose masks can change the norm by more than
      ``adaptive_tol``: when ||D W D' v|| >= (1 - adaptive_tol) ||W v||, the masked norm
      is within that factor of the global one, and the global one is used (with
      ``adaptive_from_below``, ||D W D' v|| / ||D' v|| instead: still an estimate from below).

    Masks of later layers use the radius the earlier *bounds* give, so for the sound
    levels every mask is sound whenever the bounds hold. Differentiable through the
    weights when grad is enabled (estimate level; the others are for certification).
    ``work_dtype`` is the dtype of the iterations; norms are evaluated in the model's dtype.
    Any plain Sequential of supported layers works: the input shape is taken from ``x``.
    ``clean`` is x's clean pass (``clean_pass``) when the caller already has it.
    """
    s = settings_from(settings, NormSettings, options)
    check_input(model, x)
    ops, acts = network_layers(model, input_shape=tuple(x.shape[1:]))
    eps_b = as_batch_radius(eps, x)
    vectors = start_vectors
    if vectors is None and s.init == "global" and hasattr(model, "power_vectors"):
        vectors = model.power_vectors()
    record = NormRecord(s.level)
    if s.level == "estimate":
        lb = propagate(ops, acts, x, eps_b, estimate_solver(s, record), vectors, generator, clean=clean)
        lb.level, lb.record = s.level, record
        return lb
    if global_norms is None:
        global_norms = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:])).layer_norms
    record.delta, record.delta_layer = s.delta, s.delta / max(len(ops) - 1, 1)
    solve = sound_solver(s, global_norms.to(x.dtype), record.delta_layer, generator, record.layers)
    with torch.no_grad():  # start_vectors warm-start the estimate that places the exact proof
        lb = propagate(ops, acts, x, eps_b, solve, start_vectors if s.level == "exact" else None, generator,
                       clean=clean)
    lb.level, lb.record = s.level, record
    return lb


def box_bound(model: nn.Sequential, x: Tensor, eps: Union[float, Tensor], *,
              global_norms: Optional[Tensor] = None, clean: Optional[CleanPass] = None) -> LocalBound:
    """The local bound's boxes with every layer's guaranteed global norm: deterministic and cheap.

    IBP ∩ ball boxes through every layer (the ball radius grows by the global norm of each
    layer, and the masks still shorten the rows of the ball bound), and the features' box
    for the ball ∩ box last layer. Sound because each global norm bounds its masked norm.
    """
    check_input(model, x)
    ops, acts = network_layers(model, input_shape=tuple(x.shape[1:]))
    eps_b = as_batch_radius(eps, x)
    if global_norms is None:
        global_norms = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:])).layer_norms
    solve = global_norm_solver(global_norms.to(x.dtype), x.shape[0], x.device)
    with torch.no_grad():
        lb = propagate(ops, acts, x, eps_b, solve, None, None, draw_starts=False, clean=clean)
    lb.level = "exact"
    lb.record = NormRecord("exact", layer_norms="global (guaranteed)")
    return lb


def _start_vectors(op: AffineLayer, l: int, x: Tensor, vectors: Optional[List[Tensor]],
                   generator: Optional[torch.Generator]) -> Tensor:
    if vectors is not None:
        return vectors[l].view(1, *op.in_shape).to(x.dtype).expand(x.shape[0], *op.in_shape)
    return torch.randn((x.shape[0],) + op.in_shape, generator=generator, dtype=x.dtype,
                       device="cpu" if generator is None else generator.device).to(x.device)


@dataclass
class _Walk:
    """The state carried from layer to layer by ``propagate``."""

    h: Tensor  # clean activation h_{l-1}
    lo: Tensor  # box of h_{l-1}
    hi: Tensor
    radius: Tensor  # r_{l-1}: l2 radius of h_{l-1} around its clean value
    col_mask: Optional[Tensor] = None  # O_{l-1} (None = all ones)


def propagate(ops: List[AffineLayer], acts: list, x: Tensor, eps_b: Tensor, solve: Solver,
              vectors: Optional[List[Tensor]], generator: Optional[torch.Generator],
              draw_starts: bool = True, clean: Optional[CleanPass] = None) -> LocalBound:
    """Steps 1-3 of the local bound, layer by layer, with ``solve`` giving each layer's norm."""
    w = _Walk(x, x - bcast(eps_b, x), x + bcast(eps_b, x), eps_b)
    norms, pre_bounds, masks, row_masks, iterations = [], [], [], [], []
    converged = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    deterministic = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    # The input box is x +- eps: its IBP centre is the clean pre-activation, and with one radius for
    # every sample its IBP radius |W| (eps 1) is computed once and broadcast.
    input_eps = eps_b[0] if bool((eps_b == eps_b[0]).all()) else None
    for l, (op, act) in enumerate(zip(ops[:-1], acts)):
        z = op.forward(w.h) if clean is None else clean.pre[l]
        lb, ub = op.pre_activation_box(z, w.lo, w.hi, w.radius, w.col_mask, input_eps if l == 0 else None)
        row_mask, out_mask = act.masks(lb, ub)
        v0 = _start_vectors(op, l, x, vectors, generator) if draw_starts else None
        res = solve(l, op, w.col_mask, row_mask, v0)
        norms.append(res.sigma)
        iterations.append(res.work)
        converged &= res.converged
        deterministic &= res.deterministic
        lo, hi = act.interval(lb, ub)
        w = _Walk(act(z), lo, hi, w.radius * res.sigma, out_mask)
        pre_bounds.append((lb, ub))
        masks.append(out_mask)
        row_masks.append(row_mask)
    return _result(ops, x, w, norms, clean, pre_bounds, masks, row_masks, iterations, converged, deterministic)


def _result(ops, x, w: _Walk, norms, clean, pre_bounds, masks, row_masks, iterations, converged,
            deterministic) -> LocalBound:
    if norms:
        layer_norms = torch.stack(norms, dim=1)
    else:  # no hidden layer: the "penultimate features" are the input itself
        layer_norms = x.new_zeros(x.shape[0], 0)
    h = w.h
    logits = ops[-1].forward(h) if clean is None else clean.logits
    feature_mask = torch.ones_like(h.flatten(1)) if w.col_mask is None else w.col_mask.flatten(1)
    return LocalBound(lipschitz=layer_norms.prod(dim=1), layer_norms=layer_norms, feature_radius=w.radius,
                      features=h.flatten(1), feature_lower=w.lo.flatten(1), feature_upper=w.hi.flatten(1),
                      feature_mask=feature_mask.expand(h.shape[0], -1), logits=logits, pre_bounds=pre_bounds,
                      masks=masks, iterations=iterations, converged=converged, row_masks=row_masks,
                      input_shape=tuple(x.shape[1:]), deterministic=deterministic)


def converged_layer_norms(lb: LocalBound, model: nn.Sequential, *, tol: float = 1e-6, max_iter: int = 5000,
                          generator: Optional[torch.Generator] = None) -> Tensor:
    """[B, L-1] masked layer norms of ``lb``'s own operators (same masks), Lanczos run to ``tol``.

    A diagnostic: ``lb.layer_norms / converged_layer_norms(lb, model)`` is how far a cheap
    (training-time) estimate is below the norm that certification converges to.
    """
    ops, _ = network_layers(model, input_shape=lb.input_shape)
    out = []
    with torch.no_grad():
        for op, (col, row), sigma in zip(ops[:-1], lb.operator_masks(), lb.layer_norms.unbind(1)):
            v0 = torch.randn((sigma.shape[0],) + tuple(op.in_shape), generator=generator,
                             dtype=sigma.dtype).to(sigma.device)
            res = restarted_lanczos_norm(op, col, row, v0, max_applications=max_iter, tol=tol)
            out.append(res.sigma)
    return torch.stack(out, dim=1)
