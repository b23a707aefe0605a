"""Local (Local-Lip) Lipschitz bound of the penultimate features on B(x, eps), per sample.

On the ball, bound every pre-activation by IBP ∩ ball bounds, mark neurons whose
activation is constant there, and use ``prod_l ||M_l W_l O_{l-1}||_2`` (M_l / O_l:
0/1 masks of the inputs / outputs of act_l that can vary). Fixed neurons carry no
change, so this bounds the Lipschitz constant of h_{L-1} on the ball, and it is
never larger than the global K.

``box_bound`` is the same propagation with every layer's *guaranteed global* norm in
place of the masked one: deterministic, a few forward passes, and still tighter than
GloRo's certificate (the boxes and the ball ∩ box last layer are kept).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .exact import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_FLOPS, exact_layer_solver
from .globalbound import ESTIMATE, global_bound
from .krylov import lanczos_norm, probabilistic_layer_solver
from .operators import AffineOp, _act_interval, _act_masks, _batch_norm, network_layers
from .solvers import LayerNorms, Solver
from .spectral import power_iteration_norm, restarted_lanczos_norm

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
    iterations: List[int]  # solver work per layer (max over the batch): steps, iterations or applications
    converged: Tensor  # [B] bool, every layer's estimate converged (always True for the sound levels)
    guarantee: str = ESTIMATE  # "probabilistic", "exact", or the estimate text
    row_masks: Optional[List[Tensor]] = None  # row mask of every hidden layer's masked operator
    info: Dict[str, object] = field(default_factory=dict)  # what the guarantee rests on (delta, steps, ...)
    input_shape: Tuple[int, ...] = ()  # per-sample input shape the bound was computed for
    # [B] bool: every layer norm of the sample is a deterministic upper bound (exact proof or the
    # guaranteed global norm); None for estimates.
    deterministic: Optional[Tensor] = None

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


@dataclass
class CleanPass:
    """The clean forward pass of a batch: what every bound at every radius starts from."""

    pre: List[Tensor]  # hidden pre-activations z_l
    features: Tensor  # [B, d] penultimate features h_{L-1} (flattened)
    logits: Tensor  # [B, C]

    def select(self, idx: Tensor) -> "CleanPass":
        return CleanPass([z[idx] for z in self.pre], self.features[idx], self.logits[idx])


def clean_pass(model: nn.Sequential, x: Tensor) -> CleanPass:
    """Pre-activations, penultimate features and logits of x, as the bounds compute them."""
    ops, acts = network_layers(model, input_shape=tuple(x.shape[1:]))
    h, pre = x, []
    for op, act in zip(ops[:-1], acts):
        z = op.forward(h)
        pre.append(z)
        h = act(z)
    return CleanPass(pre, h.flatten(1), ops[-1].forward(h))


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
#: Training: when to run the masked solver for a layer (see ``local_bound``).
MASKED_NORMS = ("always", "adaptive", "never")


def check_input(model: nn.Module, x: Tensor) -> None:
    """x must be a non-empty batch [B, *input_shape] of a float dtype the bounds are sound in."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch of inputs [B, ...], got shape {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (0 samples)")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x has dtype {x.dtype}: the bounds and their rounding margins assume float32 or "
                         f"float64, so reduced precision is refused (convert the model and x with .double())")
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    if dtypes and dtypes != [str(x.dtype)]:
        raise ValueError(f"the model's parameters are {', '.join(dtypes)} but x is {x.dtype}: bound and certify in "
                         f"one dtype, float32 or float64 (float64 recommended: model.double(), x.double())")
    declared = getattr(model, "input_shape", None)
    if declared is not None and tuple(declared) != tuple(x.shape[1:]):
        raise ValueError(f"input of shape {tuple(x.shape)} does not match the model's input {tuple(declared)}")


def local_bound(model: nn.Sequential, x: Tensor, eps: Union[float, Tensor], *,
                guarantee: str = "probabilistic", delta: float = 1e-9, inflation: float = 0.01,
                steps: Optional[int] = None, method: str = "lanczos", max_iter: int = 2000, tol: float = 1e-4,
                init: str = "random", generator: Optional[torch.Generator] = None,
                work_dtype: Optional[torch.dtype] = torch.float32, global_norms: Optional[Tensor] = None,
                exact_max_entries: int = DEFAULT_MAX_ENTRIES, exact_max_flops: int = DEFAULT_MAX_FLOPS,
                exact_fallback: str = "global", exact_near_global: float = 0.0, masked_norms: str = "always",
                adaptive_tol: float = 0.01, adaptive_from_below: bool = False,
                start_vectors: Optional[List[Tensor]] = None,
                clean: Optional[CleanPass] = None) -> LocalBound:
    """Local Lipschitz bound of the penultimate features on B(x, eps), per sample.

    ``guarantee`` says what each masked layer norm is:

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
    _check_levels(guarantee, method, init, masked_norms, exact_fallback)
    if (guarantee == "probabilistic" or exact_fallback == "probabilistic") and not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    check_input(model, x)
    ops, acts = network_layers(model, input_shape=tuple(x.shape[1:]))
    eps_b = _as_batch_eps(eps, x)
    vectors = start_vectors
    if vectors is None and init == "global" and hasattr(model, "power_vectors"):
        vectors = model.power_vectors()
    hidden = len(ops) - 1
    info: Dict[str, object] = {"level": guarantee}

    if guarantee == "estimate":
        solve = _estimate_solver(method, steps if steps is not None else max_iter, max_iter, tol, work_dtype,
                                 masked_norms, adaptive_tol, adaptive_from_below, info)
        lb = propagate(ops, acts, x, eps_b, solve, vectors, generator, clean=clean)
        lb.guarantee, lb.info = ESTIMATE, info
        return lb

    if global_norms is None:
        global_norms = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:])).layer_norms
    delta_layer = delta / max(hidden, 1)
    layers: List[Dict[str, object]] = []
    info.update(delta=delta, delta_layer=delta_layer, layers=layers)
    solve = _sound_solver(guarantee, global_norms.to(x.dtype), delta_layer, inflation, steps, generator, work_dtype,
                          max_iter, tol, exact_max_entries, exact_max_flops, exact_fallback, exact_near_global, layers)
    with torch.no_grad():  # start_vectors warm-start the estimate that places the exact proof
        lb = propagate(ops, acts, x, eps_b, solve, start_vectors if guarantee == "exact" else None, generator,
                       clean=clean)
    lb.guarantee, lb.info = guarantee, info
    return lb


def _sound_solver(guarantee, global_norms, delta_layer, inflation, steps, generator, work_dtype, max_iter, tol,
                  max_entries, max_flops, exact_fallback, near_global, layers) -> Solver:
    """The per-layer solver of the probabilistic or the exact level (its fallback included)."""
    probabilistic = None
    if guarantee == "probabilistic" or exact_fallback == "probabilistic":
        probabilistic = probabilistic_layer_solver(global_norms, delta_layer, inflation, steps, generator,
                                                   work_dtype, layers)
    if guarantee == "probabilistic":
        return probabilistic
    return exact_layer_solver(global_norms, max_iter, tol, work_dtype, max_entries, max_flops, layers, probabilistic,
                              near_global=near_global)


def _check_levels(guarantee: str, method: str, init: str, masked_norms: str, exact_fallback: str) -> None:
    if guarantee not in GUARANTEE_LEVELS:
        raise ValueError(f"guarantee must be one of {', '.join(GUARANTEE_LEVELS)}, got {guarantee!r}")
    if method not in ("power", "lanczos", "krylov"):
        raise ValueError(f"method must be 'power', 'lanczos' or 'krylov', got {method!r}")
    if init not in ("global", "random"):
        raise ValueError("init must be 'global' or 'random'")
    if guarantee != "estimate" and init != "random":
        raise ValueError(f"the {guarantee} guarantee needs init='random' (a start independent of the model)")
    if masked_norms not in MASKED_NORMS:
        raise ValueError(f"masked_norms must be one of {', '.join(MASKED_NORMS)}, got {masked_norms!r}")
    if masked_norms != "always" and (guarantee != "estimate" or init != "global"):
        raise ValueError("masked_norms other than 'always' is a training option: it needs guarantee='estimate' "
                         "and init='global'")
    if exact_fallback not in ("global", "probabilistic"):
        raise ValueError(f"exact_fallback must be 'global' or 'probabilistic', got {exact_fallback!r}")


def _estimate_solver(method: str, steps: int, max_iter: int, tol: float, work_dtype, masked_norms: str,
                     adaptive_tol: float, from_below: bool, info: dict) -> Solver:
    """Solver of the estimate level (from below), optionally skipping layers whose masks change nothing."""
    solved: List[float] = []
    info["masked_fraction"] = solved  # per layer: share of the samples the masked solver ran for

    def run(op, col_mask, row_mask, v0):
        if method == "krylov":
            res = lanczos_norm(op, col_mask, row_mask, v0, steps=steps, work_dtype=work_dtype)
            return res.sigma, int(res.steps.max()), torch.ones_like(res.steps, dtype=torch.bool)
        if method == "lanczos":
            res = restarted_lanczos_norm(op, col_mask, row_mask, v0, max_applications=max_iter, tol=tol,
                                         work_dtype=work_dtype)
        else:
            res = power_iteration_norm(op, col_mask, row_mask, v0, iterations=max_iter, tol=tol,
                                       work_dtype=work_dtype)
        return res.sigma, res.iterations, res.converged

    def solve(l, op, col_mask, row_mask, v0):
        batch = v0.shape[0]
        false = torch.zeros(batch, dtype=torch.bool, device=v0.device)
        if masked_norms == "always":
            sigma, work, ok = run(op, col_mask, row_mask, v0)
            solved.append(1.0)
            return LayerNorms(sigma, work, ok, false)
        # ||W v|| at the warm-start vector: the global norm estimate (differentiable through W).
        sigma_global = _batch_norm(op.linear(v0[:1]))[0]
        need = torch.zeros(batch, dtype=torch.bool, device=v0.device)
        sigma = sigma_global.expand(batch)
        if masked_norms == "adaptive":
            with torch.no_grad():
                u = v0 if col_mask is None else v0 * col_mask
                kept = _batch_norm(op.linear(u) * row_mask)
                need = kept < (1 - adaptive_tol) * sigma_global.detach()
                if from_below:  # ||D W D' v|| / ||D' v||: a Rayleigh quotient, never above the masked norm
                    un = _batch_norm(u)
                    sigma = torch.where(un > 0, kept / torch.where(un > 0, un, torch.ones_like(un)),
                                        torch.zeros_like(kept))
        idx = need.nonzero().squeeze(1)
        solved.append(float(idx.numel()) / batch)
        ok = torch.ones(batch, dtype=torch.bool, device=v0.device)
        work = 0
        if idx.numel():
            pick = (lambda m: None if m is None else (m if m.shape[0] == 1 else m[idx]))
            sub, work, sub_ok = run(op, pick(col_mask), pick(row_mask), v0[idx])
            sigma = sigma.clone().index_put((idx,), sub)  # out of place: autograd sees both sources
            ok = ok.index_put((idx,), sub_ok)
        return LayerNorms(sigma, work, ok, false)

    return solve


def box_bound(model: nn.Sequential, x: Tensor, eps: Union[float, Tensor], *,
              global_norms: Optional[Tensor] = None, clean: Optional[CleanPass] = None) -> LocalBound:
    """The local bound's boxes with every layer's guaranteed global norm: deterministic and cheap.

    IBP ∩ ball boxes through every layer (the ball radius grows by the global norm of each
    layer, and the masks still shorten the rows of the ball bound), and the features' box
    for the ball ∩ box last layer. Sound because each global norm bounds its masked norm.
    """
    check_input(model, x)
    ops, acts = network_layers(model, input_shape=tuple(x.shape[1:]))
    eps_b = _as_batch_eps(eps, x)
    if global_norms is None:
        global_norms = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:])).layer_norms
    norms = global_norms.to(x.dtype)

    def solve(l, op, col_mask, row_mask, v0):
        ones = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return LayerNorms(norms[l].expand(x.shape[0]), 0, ones, ones)

    with torch.no_grad():
        lb = propagate(ops, acts, x, eps_b, solve, None, None, draw_starts=False, clean=clean)
    lb.guarantee = "exact"
    lb.info = {"level": "exact", "layer_norms": "global (guaranteed)"}
    return lb


def _start_vectors(op: AffineOp, l: int, x: Tensor, vectors: Optional[List[Tensor]],
                   generator: Optional[torch.Generator]) -> Tensor:
    if vectors is not None:
        return vectors[l].view(1, *op.in_shape).to(x.dtype).expand(x.shape[0], *op.in_shape)
    return torch.randn((x.shape[0],) + op.in_shape, generator=generator, dtype=x.dtype,
                       device="cpu" if generator is None else generator.device).to(x.device)


def _pre_activation_box(op: AffineOp, l: int, h: Tensor, lo: Tensor, hi: Tensor, radius: Tensor,
                        col_mask: Optional[Tensor], eps_b: Tensor, same_eps: bool,
                        z: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Clean pre-activation z (given, or computed from h) and its IBP ∩ ball box (lb, ub) over the ball."""
    if z is None:
        z = op.forward(h)
    if l == 0 and same_eps:
        # The input box is x +- eps: its IBP centre is the clean pre-activation, and its radius
        # |W| (eps 1) is the same for every sample (computed once, broadcast).
        z_ibp_c = z
        z_ibp_r = op.abs_linear(torch.full((1,) + tuple(op.in_shape), 1.0, dtype=h.dtype,
                                           device=h.device)) * eps_b[0]
    else:
        # IBP: center/radius through W and |W|.
        z_ibp_c, z_ibp_r = op.forward((lo + hi) / 2), op.abs_linear((hi - lo) / 2)
    # Ball: |z_k(x') - z_k(x)| <= r_{l-1} ||row_k(W O_{l-1})||.
    z_ball_r = _bcast(radius, z) * op.row_norms(col_mask)
    return z, torch.maximum(z_ibp_c - z_ibp_r, z - z_ball_r), torch.minimum(z_ibp_c + z_ibp_r, z + z_ball_r)


def propagate(ops: List[AffineOp], acts: List[nn.Module], x: Tensor, eps_b: Tensor, solve: Solver,
              vectors: Optional[List[Tensor]], generator: Optional[torch.Generator],
              draw_starts: bool = True, clean: Optional[CleanPass] = None) -> LocalBound:
    """Steps 1-3 of the local bound, layer by layer, with ``solve`` giving each layer's norm."""
    h = x  # clean activation
    lo, hi = x - _bcast(eps_b, x), x + _bcast(eps_b, x)  # box of h_{l-1}
    radius = eps_b  # r_{l-1}: l2 radius of h_{l-1} around its clean value
    col_mask: Optional[Tensor] = None  # O_{l-1} (None = all ones)
    norms, pre_bounds, masks, row_masks, iterations = [], [], [], [], []
    converged = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    deterministic = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    same_eps = bool((eps_b == eps_b[0]).all())
    for l, (op, act) in enumerate(zip(ops[:-1], acts)):
        z, lb, ub = _pre_activation_box(op, l, h, lo, hi, radius, col_mask, eps_b, same_eps,
                                        None if clean is None else clean.pre[l])
        row_mask, out_mask = _act_masks(act, lb, ub)
        v0 = _start_vectors(op, l, x, vectors, generator) if draw_starts else None
        res = solve(l, op, col_mask, row_mask, v0)
        norms.append(res.sigma)
        iterations.append(res.work)
        converged &= res.converged
        deterministic &= res.deterministic
        radius = radius * res.sigma
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
    logits = ops[-1].forward(h) if clean is None else clean.logits
    feature_mask = torch.ones_like(h.flatten(1)) if col_mask is None else col_mask.flatten(1)
    return LocalBound(lipschitz=layer_norms.prod(dim=1), layer_norms=layer_norms, radius=radius,
                      features=h.flatten(1), feature_lower=lo.flatten(1), feature_upper=hi.flatten(1),
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
