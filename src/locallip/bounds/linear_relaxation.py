"""Linear relaxation (CROWN, Zhang et al. 2018) of the logit margins over an l2 ball, per sample.

Notation as in ``operators``: h_{-1} = x', z_l = W_l h_{l-1} + b_l, h_l = act_l(z_l), logits z_L.
Given a box [lo_l, hi_l] of every hidden pre-activation on B(x, eps), each activation lies
between two lines per neuron, aL z + cL <= act(z) <= aU z + cU on its box (``relaxations``).
A lower bound of nu . h_l follows neuron by neuron (lower line where nu > 0, upper line where
nu < 0); it is linear in z_l = W_l h_{l-1} + b_l, and so on down to the input, where the
minimum over ||x' - x|| <= eps of nu . x' + d is nu . x + d - eps ||nu||_2.

* Boxes start from the given ones (e.g. IBP ∩ ball, ``LocalBound.pre_bounds``) and are tightened
  layer by layer by the same back-substitution with +-e_k as objective, only for the neurons
  whose activation is not affine on the box (the others are relaxed exactly); the result is the
  intersection, never looser than the start. The margins are also never below interval
  arithmetic on the tightened box of h_{L-1}.
* Rounding (float64, u = 2^-53). The back-substitution is exact up to: each W^T mu (error
  <= gamma_n |W|^T |mu|; its product with h_{l-1} is <= gamma_n ||W||_F ||mu|| max ||h_{l-1}||),
  each mu . b, each coefficient times slope (<= 5u relative, slopes in [0, 1]) against max ||z||,
  each sum of intercept terms (<= ||w|| ||max(|cL|, |cU|)||), the constants' additions and the
  final concretization. Each is at most gamma_N times one term of ``mag`` (N: the largest fan-in
  plus fan-out of a layer, plus 16); the bound returned is value - 2 gamma_N mag, the factor 2
  covering the rounding of ``mag`` itself. ||h_l|| <= ||z_l|| for these activations with thresholds
  >= 0 (|clip(z)| <= |z|; sorting a pair keeps its norm), and ``relaxations.magnitude`` bounds both
  (it widens the bound where a threshold is negative). Offsets are op.forward(0): exact without a
  Normalize; with one, the model's own evaluation of W(-mean/std) + b, which the whole cascade
  takes as the network. Products are assumed to be sums of products in some order (no fast algorithms).
  A composed layer (pooling joined to a conv or linear layer) is applied stage by stage: its N counts
  every stage's fan-in and fan-out, and its ||W||_F is replaced by the product of its stages' (which
  bounds || |W_2| |W_1| ||_F, the magnitude of the two-stage rounding).
* Cost per point, per layer l: 2 rows per unstable neuron (both signs), each a back-substitution
  through layers l-1..0; C rows for the margins. Layer 1's rows stay on their receptive fields
  (the support of W_1^T e_k, closed under a MaxMin pairing, and of its image under W_0^T), so a
  convolution costs what its kernel covers, not the whole feature map. Rows run per sample, in chunks of at most
  ``DEFAULT_MAX_BYTES`` (a row holds ~6 tensors of the largest layer's size in float64).
"""
from __future__ import annotations

import copy
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .localbound import box_bound
from .margins import local_margins
from .operators import network_layers
from .relaxations import (PAIRED, Relaxation, RelaxationNotApplicable, _norm, _rowdot, check_supported,  # noqa: F401
                          magnitude, unstable_neurons)

Tensor = torch.Tensor
Bounds = List[Tuple[Tensor, Tensor]]
_U = 2.0 ** -53  # unit roundoff of float64
#: Memory for the rows of one chunk (bytes).
DEFAULT_MAX_BYTES = 256 * 2 ** 20
#: A layer's rows W^T e_k are kept explicitly below this many entries.
BASIS_MAX_ENTRIES = 2 ** 23


def _stages(op) -> list:
    """The layers an affine layer is applied as, one after the other (a composed layer's parts)."""
    parts = getattr(op, "parts", None)
    return [q for p in parts for q in _stages(p)] if parts else [op]


def _gamma(n: int) -> float:
    return n * _U / (1 - n * _U)


class LinearRelaxation:
    """The back-substitution of one network (float64 copy, per-layer rows W^T e_k and ||W||_F cached).

    Valid while the model's weights do not change."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int]):
        model = copy.deepcopy(model).double().eval()  # float64, and no graph through the weights
        model.requires_grad_(False)
        self.model = model
        self.input_shape = tuple(input_shape)
        self.ops, self.acts = network_layers(self.model, input_shape=self.input_shape)
        for act in self.acts:
            check_supported(act)
        sizes = [sum(math.prod(q.in_shape) + math.prod(q.out_shape) for q in _stages(op)) for op in self.ops]
        self.gamma = _gamma(max(sizes) + 16)
        self.max_numel = max(max(math.prod(op.in_shape), math.prod(op.out_shape)) for op in self.ops)
        with torch.no_grad():
            self.offsets = [op.forward(torch.zeros((1,) + tuple(op.in_shape), dtype=torch.float64))[0]
                            for op in self.ops]
            self.offset_norms = [float(b.norm()) for b in self.offsets]
            self.basis: List[Optional[Tensor]] = []
            self.frobenius: List[float] = []
            for op in self.ops:
                basis, fro = self._unit_rows(op)
                if len(_stages(op)) > 1:
                    fro = max(fro, math.prod(self._unit_rows(q)[1] for q in _stages(op)))
                self.basis.append(basis)
                self.frobenius.append(fro)
            self.sparse = self._support_groups()

    def _unit_rows(self, op) -> Tuple[Optional[Tensor], float]:
        """W^T e_k for every output k (kept when small enough) and ||W||_F (from the smaller side)."""
        n_in, n_out = math.prod(op.in_shape), math.prod(op.out_shape)
        keep = n_in * n_out <= BASIS_MAX_ENTRIES
        transpose_side = keep or n_out <= n_in
        n, shape = (n_out, op.out_shape) if transpose_side else (n_in, op.in_shape)
        step = max(1, BASIS_MAX_ENTRIES // max(n_in, n_out))
        parts, sq = [], 0.0
        for start in range(0, n, step):
            rows = torch.arange(start, min(start + step, n))
            eye = torch.zeros(rows.numel(), n, dtype=torch.float64)
            eye[torch.arange(rows.numel()), rows] = 1.0  # rows start.. of the identity, built chunk by chunk
            eye = eye.view(-1, *shape)
            part = op.transpose(eye) if transpose_side else op.linear(eye)
            sq += float(part.square().sum())
            if keep:
                parts.append(part)
        return (torch.cat(parts) if keep else None), math.sqrt(sq)

    def _rows_of(self, l: int, neurons: Tensor) -> Tensor:
        """W_l^T e_k for the given output indices k."""
        if self.basis[l] is not None:
            return self.basis[l][neurons]
        op = self.ops[l]
        eye = torch.zeros((neurons.numel(), math.prod(op.out_shape)), dtype=torch.float64)
        eye[torch.arange(neurons.numel()), neurons] = 1.0
        return op.transpose(eye.view(-1, *op.out_shape))

    def _chunk(self) -> int:
        return max(1, DEFAULT_MAX_BYTES // (48 * self.max_numel))

    def _back(self, nu: Tensor, const: Tensor, mag: Tensor, s: int, top: int, relax: List[Relaxation],
              ctx: dict, alpha: Optional[List[Tensor]] = None) -> Tensor:
        """Lower bound over sample s's ball, per row, of nu . h_top + const (top = -1: nu . x' + const),
        rounding covered. ``mag`` carries the magnitudes of the rounding so far; ``ctx``: x, eps, ||x||,
        the bound of ||z_l|| on the ball."""
        for l in range(top, -1, -1):
            mu, c, m = relax[l].back(nu, s, None if alpha is None else alpha[l])
            const = const + c
            mag = mag + m + 2 * _norm(nu) * ctx["zmax"][l][s] + const.abs()
            nu, const, mag = self._through_op(l, mu, const, mag, s, ctx)
        eps, nu_norm = ctx["eps"][s], _norm(nu)
        value = _rowdot(nu, ctx["x"][s:s + 1]) + const - eps * nu_norm
        mag = mag + nu_norm * (ctx["xnorm"][s] + eps) + const.abs() + value.abs()
        return value - 2 * self.gamma * mag

    def _through_op(self, l: int, mu: Tensor, const: Tensor, mag: Tensor, s: int, ctx: dict):
        """mu . z_l = (W_l^T mu) . h_{l-1} + mu . b_l, and the magnitudes of its rounding."""
        const = const + _rowdot(mu, self.offsets[l].unsqueeze(0))
        mag = mag + _norm(mu) * (self.frobenius[l] * self._h_max(l - 1, s, ctx) + self.offset_norms[l]) + const.abs()
        return self.ops[l].transpose(mu), const, mag

    @staticmethod
    def _h_max(l: int, s: int, ctx: dict) -> Tensor:
        """A bound of ||h_l|| on sample s's ball (l = -1: the input)."""
        return ctx["xnorm"][s] + ctx["eps"][s] if l < 0 else ctx["zmax"][l][s]

    def _context(self, x: Tensor, eps: Tensor) -> dict:
        return {"x": x, "eps": eps, "xnorm": _norm(x), "zmax": []}

    def _add_layer(self, ctx: dict, relax: List[Relaxation], l: int, lo: Tensor, hi: Tensor) -> None:
        """Relax layer l on its (final) box; record the norm bound of z_l and h_l on the ball."""
        ctx["zmax"].append(_norm(magnitude(self.acts[l], lo, hi)))
        relax.append(Relaxation(self.acts[l], lo, hi))

    def _back_first(self, nu: Tensor, const: Tensor, mag: Tensor, s: int, relax: List[Relaxation], ctx: dict,
                    group: Tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """``_back`` from h_0 for rows supported on the coordinates S of h_0 (nu: [rows, |S|]), whose
        W_0^T images are supported on the input coordinates T: ``group`` = (S, T, (W_0^T)[T, S]^T).
        The same arithmetic as ``_back`` on the nonzero coordinates only (convolutions' receptive fields)."""
        support, inputs, w0t = group
        mu, c, m = relax[0].back(nu, s, support=support)
        const = const + c
        mag = mag + m + 2 * _norm(nu) * ctx["zmax"][0][s] + const.abs()
        const = const + mu @ self.offsets[0].flatten()[support]
        mag = mag + _norm(mu) * (self.frobenius[0] * self._h_max(-1, s, ctx) + self.offset_norms[0]) + const.abs()
        nu = mu @ w0t
        eps, nu_norm = ctx["eps"][s], _norm(nu)
        value = nu @ ctx["x"][s].flatten()[inputs] + const - eps * nu_norm
        mag = mag + nu_norm * (ctx["xnorm"][s] + eps) + const.abs() + value.abs()
        return value - 2 * self.gamma * mag

    def _support_groups(self) -> Optional[Tuple[Tensor, Tensor, List[Tuple[Tensor, Tensor, Tensor]]]]:
        """Layer 1's neurons grouped by the support of W_1^T e_k: (group of each neuron, each neuron's
        row on its support, each group's ``_back_first`` data); None where it does not apply (a layer
        not kept explicitly). Pairs at layer 0 (MaxMin): supports closed under c <-> c + C/2."""
        if len(self.ops) < 3 or self.basis[0] is None or self.basis[1] is None:
            return None
        rows1, rows0 = self.basis[1].flatten(1), self.basis[0].flatten(1)
        nonzero = rows1 != 0
        if isinstance(self.acts[0], PAIRED):
            first, second = nonzero.chunk(2, dim=1)
            nonzero = (first | second).repeat(1, 2)
        keys, member = torch.unique(nonzero, dim=0, return_inverse=True)
        groups = []
        compact = torch.zeros(rows1.shape[0], int(keys.sum(1).max()), dtype=torch.float64)
        for g, key in enumerate(keys):
            support = key.nonzero().squeeze(1)
            inputs = (rows0[support] != 0).any(0).nonzero().squeeze(1)
            groups.append((support, inputs, rows0[support][:, inputs].contiguous()))
            compact[member == g, :support.numel()] = rows1[member == g][:, support]
        return member, compact, groups

    def _tighten_first(self, s: int, neurons: Tensor, lower: Tensor, upper: Tensor, relax, ctx) -> None:
        """Layer 1's boxes of sample s by ``_back_first``, the neurons grouped by support."""
        member, compact, groups = self.sparse
        offsets = self.offsets[1].flatten()
        group_of = member[neurons]
        order = torch.argsort(group_of, stable=True)
        ids, counts = torch.unique_consecutive(group_of[order], return_counts=True)
        for g, k in zip(ids.tolist(), neurons[order].split(counts.tolist())):
            rows, b = compact[k, :groups[g][0].numel()], offsets[k]
            mag = self.frobenius[1] * self._h_max(0, s, ctx) + b.abs()
            value = self._back_first(torch.cat([rows, -rows]), torch.cat([b, -b]), torch.cat([mag, mag]), s, relax,
                                     ctx, groups[g])
            lower[s, k] = torch.maximum(lower[s, k], value[:k.numel()])
            upper[s, k] = torch.minimum(upper[s, k], -value[k.numel():])

    def bounds(self, x: Tensor, eps: Tensor, pre_bounds: Bounds) -> Tuple[Bounds, List[Relaxation], dict]:
        """Every hidden pre-activation box, tightened by back-substitution where the activation is not affine."""
        ctx, relax, out = self._context(x, eps), [], []
        step = max(1, self._chunk() // 2)  # two rows (both signs) per neuron
        for l, (lo, hi) in enumerate(pre_bounds):
            lo, hi = lo.to(torch.float64), hi.to(torch.float64)
            unstable = unstable_neurons(self.acts[l], lo, hi).flatten(1)
            lower, upper = lo.flatten(1).clone(), hi.flatten(1).clone()
            offsets = self.offsets[l].flatten()
            for s in range(x.shape[0]):
                neurons = unstable[s].nonzero().squeeze(1)
                if l == 1 and self.sparse is not None:
                    self._tighten_first(s, neurons, lower, upper, relax, ctx)
                    continue
                for k in neurons.split(step):
                    rows, b = self._rows_of(l, k), offsets[k]
                    mag = self.frobenius[l] * self._h_max(l - 1, s, ctx) + b.abs()
                    value = self._back(torch.cat([rows, -rows]), torch.cat([b, -b]), torch.cat([mag, mag]), s,
                                       l - 1, relax, ctx)
                    lower[s, k] = torch.maximum(lower[s, k], value[:k.numel()])
                    upper[s, k] = torch.minimum(upper[s, k], -value[k.numel():])
            lo, hi = lower.view_as(lo), upper.view_as(hi)
            out.append((lo, hi))
            self._add_layer(ctx, relax, l, lo, hi)
        return out, relax, ctx

    def margins(self, x: Tensor, y: Tensor, eps: Tensor, pre_bounds: Bounds, alpha_steps: int = 0,
                alpha_lr: float = 0.1) -> Tensor:
        """[B, C] lower bounds of z_y - z_j over the ball (0 in column y)."""
        with torch.no_grad():
            boxes, relax, ctx = self.bounds(x, eps, pre_bounds)
            h_box = self._penultimate_box(x, eps, boxes)
        last, top = self.ops[-1], len(self.ops) - 2
        eye = torch.eye(math.prod(last.out_shape), dtype=torch.float64)
        result = []
        for s in range(x.shape[0]):
            c = eye[y[s]].unsqueeze(0) - eye  # row j: e_y - e_j
            with torch.no_grad():
                const = _rowdot(c, self.offsets[-1].unsqueeze(0))
                mag = _norm(c) * (self.frobenius[-1] * self._h_max(top, s, ctx) + self.offset_norms[-1]) + const.abs()
                nu = last.transpose(c)
                best = torch.maximum(self._back(nu, const, mag, s, top, relax, ctx),
                                     self._interval(nu, const, mag, h_box[0][s:s + 1], h_box[1][s:s + 1]))
            if alpha_steps > 0 and top >= 0:
                best = torch.maximum(best, self._alpha(nu, const, mag, s, top, relax, ctx, alpha_steps, alpha_lr))
            result.append(best)
        out = torch.stack(result)
        return out.masked_fill(torch.nn.functional.one_hot(y, out.shape[1]).bool(), 0.0)

    def _penultimate_box(self, x: Tensor, eps: Tensor, boxes: Bounds) -> Tuple[Tensor, Tensor]:
        """The box of h_{L-1} on the ball: the last hidden layer's activation interval (the input's box without one)."""
        if not boxes:
            r = eps.view(-1, *([1] * (x.dim() - 1)))
            return x - r, x + r
        (lo, hi), act = boxes[-1], self.acts[-1]
        return act.interval(lo, hi)

    def _interval(self, nu: Tensor, const: Tensor, mag: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Interval bound nu . h + const >= sum min(nu lo, nu hi) + const on the (tightened) box of h: so the
        margins are never looser than IBP on the boxes. Rounding as in ``_back`` (|h| <= max(|lo|, |hi|))."""
        value = torch.minimum(nu * lo, nu * hi).flatten(1).sum(1) + const
        h_max = _norm(torch.maximum(lo.abs(), hi.abs()))
        return value - 2 * self.gamma * (mag + _norm(nu) * h_max + value.abs())

    def _alpha(self, nu, const, mag, s: int, top: int, relax, ctx, steps: int, lr: float) -> Tensor:
        """alpha-CROWN: lower slopes per row (margin) tuned by Adam on the bound, kept in [0, 1].

        Every evaluated bound is sound (any slope in [0, 1] with its intercept is a valid line);
        the best per row is returned. Intermediate boxes stay as computed."""
        with torch.enable_grad():  # the caller may run under no_grad
            alpha = [r.a_lower[s:s + 1].expand(nu.shape[0], *r.a_lower.shape[1:]).clone().requires_grad_(True)
                     for r in relax]
            opt = torch.optim.Adam(alpha, lr=lr)
            best = torch.full_like(const, -math.inf)
            for _ in range(steps):
                value = self._back(nu, const, mag, s, top, relax, ctx, alpha)
                best = torch.maximum(best, value.detach())
                opt.zero_grad()
                (-value.sum()).backward()
                opt.step()
                with torch.no_grad():
                    for a in alpha:
                        a.clamp_(0, 1)
        with torch.no_grad():
            return torch.maximum(best, self._back(nu, const, mag, s, top, relax, ctx, alpha))


def _batch_eps(eps: Union[float, Tensor], batch: int) -> Tensor:
    e = torch.as_tensor(eps, dtype=torch.float64)
    e = e.expand(batch).clone() if e.dim() == 0 else e.clone()
    if e.shape != (batch,) or not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ValueError(f"eps must be finite, >= 0, a scalar or one value per sample (batch {batch})")
    return e


def linear_relaxation_margins(model: nn.Module, x: Tensor, y: Tensor, eps: Union[float, Tensor], *,
                              start=None, pre_bounds: Optional[Bounds] = None, alpha_steps: int = 0,
                              alpha_lr: float = 0.1, network: Optional[LinearRelaxation] = None) -> Tensor:
    """[B, C] float64 lower bounds of z_y - z_j over B(x_b, eps_b) for every j (0 in column y).

    Starts from the boxes of ``start`` (a ``LocalBound`` of x at eps: ``box_bound`` or ``local_bound``)
    and is then never below its ``local_margins`` (taken as computed: they carry no rounding allowance
    of their own, as in the cascade); or from ``pre_bounds`` (a box (lb, ub) of every hidden
    pre-activation on the ball), never below IBP on those boxes up to the rounding allowance.
    Neither given: ``box_bound``'s boxes, without its margins (every value rounding-covered).
    ``alpha_steps`` > 0 tunes the lower slopes (alpha-CROWN). ``network``: a ``LinearRelaxation`` of
    the model to reuse. Raises ``RelaxationNotApplicable`` for activations it does not relax.
    """
    net = network or LinearRelaxation(model, tuple(x.shape[1:]))
    x64 = x.detach().to(torch.float64)
    eps_b = _batch_eps(eps, x.shape[0])
    if start is None and pre_bounds is None:
        pre_bounds = box_bound(net.model, x64, eps_b).pre_bounds
    boxes = start.pre_bounds if start is not None else pre_bounds
    if len(boxes) != len(net.acts):
        raise ValueError(f"pre_bounds has {len(boxes)} layers, the network {len(net.acts)} hidden layers")
    out = net.margins(x64, y, eps_b, boxes, alpha_steps, alpha_lr)
    if start is not None:
        with torch.no_grad():
            own = net.model if start.features.dtype == torch.float64 else model  # local_margins in start's dtype
            out = torch.maximum(out, local_margins(own, start, y).to(torch.float64))
    return out
