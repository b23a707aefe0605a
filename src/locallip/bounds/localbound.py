"""Local (Local-Lip) Lipschitz bound of the penultimate features on B(x, eps), per sample.

On the ball, bound every pre-activation by IBP ∩ ball bounds, mark neurons whose
activation is constant there, and use ``prod_l ||M_l W_l O_{l-1}||_2`` (M_l / O_l:
0/1 masks of the inputs / outputs of act_l that can vary). Fixed neurons carry no
change, so this bounds the Lipschitz constant of h_{L-1} on the ball, and it is
never larger than the global K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .exact import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_FLOPS, exact_masked_norms
from .globalbound import ESTIMATE, global_bound
from .krylov import choose_side, fp_margin, lanczos_inflation, masked_operator_norm_krylov, steps_for_inflation
from .operators import AffineOp, _act_interval, _act_masks, network_layers
from .spectral import masked_operator_norm, masked_operator_norm_lanczos

Tensor = torch.Tensor


@dataclass
class LocalBound:
    lipschitz: Tensor  # [B] local Lipschitz bound of the penultimate features on B(x, eps)
    layer_norms: Tensor  # [B, L-1] masked operator norms
    radius: Tensor  # [B] eps * lipschitz: how far the penultimate features can move
    features: Tensor  # [B, d] clean penultimate features (flattened)
    feature_lower: Tensor  # [B, d] box of the penultimate features on the ball
    feature_upper: Tensor
    feature_mask: Tensor  # [B, d] 1 where a penultimate feature can vary
    logits: Tensor  # [B, C] clean logits
    pre_bounds: List[Tuple[Tensor, Tensor]]  # (lb, ub) of every hidden pre-activation (IBP ∩ ball)
    masks: List[Tensor]  # output masks of every activation (1 = varying)
    iterations: List[int]  # power iterations used per layer (max over the batch)
    converged: Tensor  # [B] bool, every layer converged within max_iter
    guarantee: str = ESTIMATE  # "probabilistic", "exact", or the estimate text
    row_masks: Optional[List[Tensor]] = None  # row mask of every hidden layer's masked operator
    info: Dict[str, object] = field(default_factory=dict)  # what the guarantee rests on (delta, steps, ...)
    input_shape: Tuple[int, ...] = ()  # per-sample input shape the bound was computed for

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


def _as_batch_eps(eps: Union[float, Tensor], x: Tensor) -> Tensor:
    e = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if e.dim() == 0:
        e = e.expand(x.shape[0])
    if e.shape != (x.shape[0],):
        raise ValueError(f"eps must be a scalar or one value per sample, got shape {tuple(e.shape)}")
    if torch.any(e < 0) or not torch.all(torch.isfinite(e)):
        raise ValueError("eps must be finite and >= 0")
    return e


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


GUARANTEE_LEVELS = ("probabilistic", "exact", "estimate")


def local_bound(model: nn.Sequential, x: Tensor, eps: Union[float, Tensor], *,
                guarantee: str = "probabilistic", delta: float = 1e-9, inflation: float = 0.01,
                steps: Optional[int] = None, method: str = "lanczos", max_iter: int = 2000, tol: float = 1e-4,
                init: str = "random", generator: Optional[torch.Generator] = None,
                work_dtype: Optional[torch.dtype] = torch.float32, global_norms: Optional[Tensor] = None,
                exact_max_entries: int = DEFAULT_MAX_ENTRIES, exact_max_flops: int = DEFAULT_MAX_FLOPS
                ) -> LocalBound:
    """Local Lipschitz bound of the penultimate features on B(x, eps), per sample.

    ``guarantee`` says what each masked layer norm is:

    * "probabilistic" (default): an upper bound with probability >= 1 - delta / (L - 1) per
      layer (so >= 1 - delta per sample, union bound), from plain Lanczos with a random start
      (``generator``) inflated by the Kuczynski-Wozniakowski factor and a rounding margin
      (``bounds.krylov``). ``steps`` defaults to the fewest that keep the inflation at most
      ``inflation``. Where the inflation would be unbounded, the layer's guaranteed global norm.
    * "exact": a deterministic upper bound (explicit Gram matrix and a Cholesky proof,
      ``bounds.exact``), or the layer's guaranteed global norm where the layer exceeds the
      budget or no proof succeeds.
    * "estimate": the value a solver converges to from below, no guarantee: ``method``
      "lanczos" (restarted, to ``tol``), "power" (to ``tol``, or exactly ``max_iter``
      iterations with tol 0) or "krylov" (exactly ``max_iter`` plain Lanczos steps).
      init="global" starts from the model's global singular vectors (training).

    Masks of later layers use the radius the earlier *bounds* give, so for the sound
    levels every mask is sound whenever the bounds hold. Differentiable through the
    weights when grad is enabled (estimate level; the others are for certification).
    ``work_dtype`` is the dtype of the iterations; norms are evaluated in the model's dtype.
    Any plain Sequential of supported layers works: the input shape is taken from ``x``.
    """
    if guarantee not in GUARANTEE_LEVELS:
        raise ValueError(f"guarantee must be one of {', '.join(GUARANTEE_LEVELS)}, got {guarantee!r}")
    if method not in ("power", "lanczos", "krylov"):
        raise ValueError(f"method must be 'power', 'lanczos' or 'krylov', got {method!r}")
    if init not in ("global", "random"):
        raise ValueError("init must be 'global' or 'random'")
    if guarantee != "estimate" and init != "random":
        raise ValueError(f"the {guarantee} guarantee needs init='random' (a start independent of the model)")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch of inputs [B, ...], got shape {tuple(x.shape)}")
    declared = getattr(model, "input_shape", None)
    if declared is not None and tuple(declared) != tuple(x.shape[1:]):
        raise ValueError(f"input of shape {tuple(x.shape)} does not match the model's input {tuple(declared)}")
    ops, acts = network_layers(model, input_shape=tuple(x.shape[1:]))
    eps_b = _as_batch_eps(eps, x)
    vectors = model.power_vectors() if (init == "global" and hasattr(model, "power_vectors")) else None
    hidden = len(ops) - 1
    info: Dict[str, object] = {"level": guarantee}

    if guarantee == "estimate":
        def solve(l, op, col_mask, row_mask, v0):
            if method == "krylov":
                res = masked_operator_norm_krylov(op, col_mask, row_mask, v0, steps=max_iter, work_dtype=work_dtype)
                return res.sigma, int(res.steps.max()), torch.ones_like(res.steps, dtype=torch.bool)
            fn = masked_operator_norm_lanczos if method == "lanczos" else masked_operator_norm
            res = fn(op, col_mask, row_mask, v0, max_iter=max_iter, tol=tol, work_dtype=work_dtype)
            return res.sigma, res.iterations, res.converged
        lb = _local_bound_with(ops, acts, x, eps_b, solve, vectors, generator)
        lb.guarantee, lb.info = ESTIMATE, info
        return lb

    if global_norms is None:
        global_norms = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:])).layer_norms
    global_norms = global_norms.to(x.dtype)
    delta_layer = delta / max(hidden, 1)
    layers: List[Dict[str, object]] = []
    info.update(delta=delta, delta_layer=delta_layer, layers=layers)

    if guarantee == "probabilistic":
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")

        def solve(l, op, col_mask, row_mask, v0):
            side = choose_side(op)
            shape = tuple(op.in_shape if side == "input" else op.out_shape)
            n_max = math.prod(shape)
            k = steps if steps is not None else steps_for_inflation(n_max, delta_layer, inflation)
            start = torch.randn((x.shape[0],) + shape, generator=generator, dtype=x.dtype,
                                device="cpu" if generator is None else generator.device).to(x.device)
            res = masked_operator_norm_krylov(op, col_mask, row_mask, start, steps=k, side=side,
                                              work_dtype=work_dtype)
            wd = work_dtype or x.dtype
            e = torch.tensor([lanczos_inflation(int(n), int(t), delta_layer) if int(n) > 0 else 0.0
                              for n, t in zip(res.dims.tolist(), res.steps.tolist())], dtype=torch.float64)
            margin = torch.tensor([fp_margin(int(n), max(int(t), 1), wd) for n, t in
                                   zip(res.dims.tolist(), res.steps.tolist())], dtype=torch.float64)
            usable = e < 1
            factor = (1 + margin) / torch.sqrt(torch.where(usable, 1 - e, torch.ones_like(e)))
            upper = res.sigma.detach() * factor.to(x.dtype).to(x.device)
            upper = torch.where(usable.to(x.device), upper, global_norms[l].expand_as(upper))
            upper = torch.minimum(upper, global_norms[l].expand_as(upper))
            layers.append({"side": side, "steps": int(k), "n_max": int(n_max),
                           "inflation_max": float((factor[usable] - 1).max()) if bool(usable.any()) else None,
                           "inflation_median": float((factor[usable] - 1).median()) if bool(usable.any()) else None,
                           "fp_margin_max": float(margin.max()), "global_fallback": int((~usable).sum())})
            return upper, int(k), torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    else:  # exact
        def solve(l, op, col_mask, row_mask, v0):
            side = choose_side(op)
            est = masked_operator_norm_lanczos(op, col_mask, row_mask, v0, max_iter=max_iter, tol=tol,
                                               work_dtype=work_dtype)
            bound, proven = exact_masked_norms(op, col_mask, row_mask, est.sigma.detach(), side,
                                               exact_max_entries, exact_max_flops)
            g = global_norms[l].expand(x.shape[0])
            upper = torch.where(proven, torch.minimum(bound.to(x.dtype), g), g)
            layers.append({"side": side, "proven": int(proven.sum()), "global_fallback": int((~proven).sum())})
            return upper, est.iterations, torch.ones(x.shape[0], dtype=torch.bool, device=x.device)

    with torch.no_grad():
        lb = _local_bound_with(ops, acts, x, eps_b, solve, None, generator)
    lb.guarantee, lb.info = guarantee, info
    return lb


def _start_vectors(op: AffineOp, l: int, x: Tensor, vectors: Optional[List[Tensor]],
                   generator: Optional[torch.Generator]) -> Tensor:
    if vectors is not None:
        return vectors[l].view(1, *op.in_shape).to(x.dtype).expand(x.shape[0], *op.in_shape)
    return torch.randn((x.shape[0],) + op.in_shape, generator=generator, dtype=x.dtype,
                       device="cpu" if generator is None else generator.device).to(x.device)


def _local_bound_with(ops: List[AffineOp], acts: List[nn.Module], x: Tensor, eps_b: Tensor, solve,
                      vectors: Optional[List[Tensor]], generator: Optional[torch.Generator]) -> LocalBound:
    """Steps 1-3 of the local bound with ``solve(l, op, col_mask, row_mask, v0) -> (sigma, iters, ok)``."""
    h = x  # clean activation
    lo, hi = x - _bcast(eps_b, x), x + _bcast(eps_b, x)  # box of h_{l-1}
    radius = eps_b  # r_{l-1}: l2 radius of h_{l-1} around its clean value
    col_mask: Optional[Tensor] = None  # O_{l-1} (None = all ones)
    norms, pre_bounds, masks, row_masks, iterations = [], [], [], [], []
    converged = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    same_eps = bool((eps_b == eps_b[0]).all())
    for l, (op, act) in enumerate(zip(ops[:-1], acts)):
        z = op.forward(h)
        if l == 0 and same_eps:
            # The input box is x +- eps: its IBP centre is the clean pre-activation, and its radius
            # |W| (eps 1) is the same for every sample (computed once, broadcast).
            z_ibp_c = z
            z_ibp_r = op.abs_linear(torch.full((1,) + tuple(op.in_shape), 1.0, dtype=x.dtype,
                                               device=x.device)) * eps_b[0]
        else:
            # IBP: center/radius through W and |W|.
            z_ibp_c, z_ibp_r = op.forward((lo + hi) / 2), op.abs_linear((hi - lo) / 2)
        # Ball: |z_k(x') - z_k(x)| <= r_{l-1} ||row_k(W O_{l-1})||.
        z_ball_r = _bcast(radius, z) * op.row_norms(col_mask)
        lb = torch.maximum(z_ibp_c - z_ibp_r, z - z_ball_r)
        ub = torch.minimum(z_ibp_c + z_ibp_r, z + z_ball_r)
        row_mask, out_mask = _act_masks(act, lb, ub)
        sigma, iters, ok = solve(l, op, col_mask, row_mask, _start_vectors(op, l, x, vectors, generator))
        norms.append(sigma)
        iterations.append(iters)
        converged &= ok
        radius = radius * sigma
        h = act(z)
        lo, hi = _act_interval(act, lb, ub)
        pre_bounds.append((lb, ub))
        masks.append(out_mask)
        row_masks.append(row_mask)
        col_mask = out_mask
    if norms:
        layer_norms = torch.stack(norms, dim=1)
    else:  # no hidden layer: the "penultimate features" are the input itself
        layer_norms = x.new_zeros(x.shape[0], 0)
    lipschitz = layer_norms.prod(dim=1)
    logits = ops[-1].forward(h)
    feature_mask = torch.ones_like(h.flatten(1)) if col_mask is None else col_mask.flatten(1)
    return LocalBound(lipschitz=lipschitz, layer_norms=layer_norms, radius=radius, features=h.flatten(1),
                      feature_lower=lo.flatten(1), feature_upper=hi.flatten(1),
                      feature_mask=feature_mask.expand(h.shape[0], -1), logits=logits, pre_bounds=pre_bounds,
                      masks=masks, iterations=iterations, converged=converged, row_masks=row_masks,
                      input_shape=tuple(x.shape[1:]))


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
            res = masked_operator_norm_lanczos(op, col, row, v0, max_iter=max_iter, tol=tol)
            out.append(res.sigma)
    return torch.stack(out, dim=1)
