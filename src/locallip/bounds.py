"""Global (GloRo) and local (Local-Lip) Lipschitz bounds of a ``LipschitzNet``.

Notation: h_0 = x, z_l = W_l h_{l-1} + b_l, h_l = act_l(z_l) for l < L, logits z_L.

* Global: ``K = prod_{l<L} ||W_l||_2`` bounds the Lipschitz constant of the
  penultimate features h_{L-1} everywhere; the margin z_y - z_j then moves by
  at most eps * K * ||w_y - w_j|| on an eps-ball.
* Local: on the ball B(x, eps), bound every pre-activation by IBP ∩ ball
  bounds, mark neurons whose activation is constant there, and use
  ``prod_l ||M_l W_l O_{l-1}||_2`` (M_l / O_l: 0/1 masks of the inputs / outputs
  of act_l that can vary). Fixed neurons carry no change, so this bounds the
  Lipschitz constant of h_{L-1} on the ball, and it is never larger than K.

Power iteration approaches a norm from below: ``global_bound(..., method=
"guaranteed")`` gives true upper bounds (exact SVD for dense layers, an FFT
circulant-embedding bound for convolutions); local norms are power-iteration
estimates run to a stated tolerance, and every result says which it carries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .activations import LipschitzActivation
from .models import Normalize

Tensor = torch.Tensor

GUARANTEED = "upper bound: exact SVD (dense), FFT circulant-embedding bound (conv)"
ESTIMATE = "estimate: power iteration (approaches the norm from below)"


# --------------------------------------------------------------------------- layer operators


class AffineOp:
    """One Conv2d/Linear layer as an operator on per-sample tensors of ``in_shape``.

    A preceding ``Normalize`` is folded in (its 1/std scales the input columns;
    its shift only moves the bias), and a preceding ``Flatten`` is applied inside.
    """

    def __init__(self, layer: nn.Module, in_shape: Sequence[int], norm: Optional[Normalize] = None,
                 flatten: bool = False):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"unsupported layer {type(layer).__name__}")
        self.layer = layer
        self.in_shape = tuple(in_shape)
        self.norm = norm
        self.flatten = flatten
        self._weight: Optional[Tensor] = None  # set by cast(): the same operator in another dtype
        self._std: Optional[Tensor] = None
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
                raise ValueError("only plain zero-padded Conv2d (groups=1, dilation=1) is supported")
            if flatten:
                raise ValueError("Flatten before Conv2d is not supported")
            c, h, w = self.in_shape
            kh, kw = layer.kernel_size
            (sh, sw), (ph, pw) = layer.stride, layer.padding
            oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
            self.out_shape = (layer.out_channels, oh, ow)
            self.output_padding = (h - ((oh - 1) * sh - 2 * ph + kh), w - ((ow - 1) * sw - 2 * pw + kw))
        else:
            n = 1
            for s in self.in_shape:
                n *= s
            if n != layer.in_features:
                raise ValueError(f"Linear expects {layer.in_features} inputs, gets {self.in_shape}")
            self.out_shape = (layer.out_features,)

    @property
    def weight(self) -> Tensor:
        return self.layer.weight if self._weight is None else self._weight

    def cast(self, dtype: torch.dtype) -> "AffineOp":
        """The same linear operator with detached weights in ``dtype`` (for cheap power iterations)."""
        op = AffineOp.__new__(AffineOp)
        op.__dict__.update(self.__dict__)
        op._weight = self.layer.weight.detach().to(dtype)
        op._std = None if self.norm is None else self.norm.std.to(dtype)
        return op

    def _scale(self, v: Tensor, power: int = 1) -> Tensor:
        if self.norm is None:
            return v
        std = self.norm.std if self._std is None else self._std
        return v / std ** power

    def _apply(self, v: Tensor, weight: Tensor) -> Tensor:
        if isinstance(self.layer, nn.Conv2d):
            return F.conv2d(v, weight, None, self.layer.stride, self.layer.padding)
        return F.linear(v.flatten(1), weight)

    def forward(self, h: Tensor) -> Tensor:
        """z = W h + b, exactly as the model computes it."""
        if self.norm is not None:
            h = self.norm(h)
        if self.flatten:
            h = h.flatten(1)
        return self.layer(h)

    def linear(self, v: Tensor) -> Tensor:
        """W v (no bias)."""
        return self._apply(self._scale(v), self.weight)

    def transpose(self, u: Tensor) -> Tensor:
        """W^T u, shaped like the layer input."""
        if isinstance(self.layer, nn.Conv2d):
            v = F.conv_transpose2d(u, self.weight, None, self.layer.stride, self.layer.padding,
                                   self.output_padding)
        else:
            v = (u @ self.weight).view(u.shape[0], *self.in_shape)
        return self._scale(v)

    def abs_linear(self, v: Tensor) -> Tensor:
        """|W| v, for interval radii."""
        return self._apply(self._scale(v), self.weight.abs())

    def row_norms(self, col_mask: Optional[Tensor] = None) -> Tensor:
        """||row_k(W diag(col_mask))||_2 for every output neuron k (exact at padded borders)."""
        if col_mask is None:
            col_mask = torch.ones((1,) + self.in_shape, dtype=self.weight.dtype, device=self.weight.device)
        sq = self._apply(self._scale(col_mask, power=2), self.weight.square())
        # Clamping away from 0 only enlarges the norm (sound) and keeps sqrt differentiable.
        return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, (LipschitzActivation, nn.ReLU))


def network_layers(model: nn.Sequential, input_shape: Optional[Sequence[int]] = None
                   ) -> Tuple[List[AffineOp], List[nn.Module]]:
    """Split a Sequential into affine operators and the activations between them.

    Returns ``(ops, acts)`` with ``len(acts) == len(ops) - 1``: act l follows op l,
    and the last op gives the logits.
    """
    shape = tuple(input_shape or getattr(model, "input_shape", ()))
    if not shape:
        raise ValueError("model has no input_shape; pass input_shape")
    ops: List[AffineOp] = []
    acts: List[nn.Module] = []
    norm, flatten, expect_op = None, False, True
    for m in model:
        if isinstance(m, Normalize):
            if ops or norm is not None:
                raise ValueError("Normalize is only supported as the first module")
            norm = m
        elif isinstance(m, nn.Flatten):
            flatten = True
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            if not expect_op:
                raise ValueError("two affine layers in a row: put an activation between them")
            op = AffineOp(m, shape, norm, flatten)
            ops.append(op)
            shape = op.out_shape
            norm, flatten, expect_op = None, False, False
        elif _is_activation(m):
            if expect_op:
                raise ValueError(f"activation {type(m).__name__} must follow an affine layer")
            acts.append(m)
            expect_op = True
        else:
            raise ValueError(f"unsupported module {type(m).__name__}: the bounds handle Conv2d, Linear, "
                             f"Flatten, Normalize (first) and locallip activations")
    if not ops or expect_op or not isinstance(ops[-1].layer, nn.Linear):
        raise ValueError("the model must end with a Linear layer giving the logits")
    if len(ops) < 2:
        raise ValueError("the model needs at least one hidden layer")
    return ops, acts


def _act_interval(act: nn.Module, lb: Tensor, ub: Tensor) -> Tuple[Tensor, Tensor]:
    return (torch.relu(lb), torch.relu(ub)) if isinstance(act, nn.ReLU) else act.interval(lb, ub)


def _act_masks(act: nn.Module, lb: Tensor, ub: Tensor) -> Tuple[Tensor, Tensor]:
    if isinstance(act, nn.ReLU):
        v = (ub > 0).to(lb.dtype)
        return v, v
    return act.masks(lb, ub)


# --------------------------------------------------------------------------- power iteration


def _batch_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _normalize(v: Tensor) -> Tensor:
    n = _batch_norm(v)
    # No epsilon added to the norm: a zero vector stays zero instead of shrinking others.
    return v / torch.where(n > 0, n, torch.ones_like(n)).view(-1, *([1] * (v.dim() - 1)))


def _in_dtype(dtype: Optional[torch.dtype], op: AffineOp, v0: Tensor, col_mask: Optional[Tensor],
              row_mask: Optional[Tensor]):
    """The operator, start vector and masks in ``dtype`` (unchanged when None or already so)."""
    if dtype is None or dtype == op.weight.dtype:
        return op, v0, col_mask, row_mask
    return (op.cast(dtype), v0.to(dtype), None if col_mask is None else col_mask.to(dtype),
            None if row_mask is None else row_mask.to(dtype))


def _masked_linear(op: AffineOp, v: Tensor, col_mask: Optional[Tensor], row_mask: Optional[Tensor]) -> Tensor:
    """A v with A = diag(row_mask) W diag(col_mask) (None = all ones)."""
    out = op.linear(v if col_mask is None else v * col_mask)
    return out if row_mask is None else out * row_mask


def _masked_transpose(op: AffineOp, u: Tensor, col_mask: Optional[Tensor]) -> Tensor:
    """A^T u for u = A v (already zero outside the row mask, so the row mask is not applied again)."""
    out = op.transpose(u)
    return out if col_mask is None else out * col_mask


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


# --------------------------------------------------------------------------- global bound


@dataclass
class GlobalBound:
    layer_norms: Tensor  # [L-1] spectral norm of each layer before the logits
    lipschitz: Tensor  # product: Lipschitz bound of the penultimate features
    guarantee: str  # GUARANTEED or ESTIMATE
    method: str


def _polyphase_kernel(w: Tensor, stride: Tuple[int, int], padding: Tuple[int, int]) -> Tensor:
    """Kernel of the stride-1 convolution that a strided one is on its polyphase components.

    Input pixel s*m + rho is pixel m of component rho, so tap a of a stride-s
    conv reads component (a - p) mod s at offset floor((a - p) / s).
    """
    (sh, sw), (ph, pw) = stride, padding
    co, ci, kh, kw = w.shape
    qh = [(a - ph) // sh for a in range(kh)]
    qw = [(a - pw) // sw for a in range(kw)]
    out = w.new_zeros(co, ci * sh * sw, max(qh) - min(qh) + 1, max(qw) - min(qw) + 1)
    for ah in range(kh):
        for aw in range(kw):
            rh, rw = (ah - ph) % sh, (aw - pw) % sw
            out[:, rh * sw + rw::sh * sw, qh[ah] - min(qh), qw[aw] - min(qw)] = w[:, :, ah, aw]
    return out


def _conv_norm_upper(op: AffineOp) -> Tensor:
    """Upper bound of a zero-padded, possibly strided convolution's spectral norm.

    A stride-s conv is a stride-1 conv on the s*s polyphase components of its
    input (a permutation, so norm-preserving). That conv is a restriction of a
    circular convolution on a torus large enough that nothing wraps around
    (zero-embedded input, subset of outputs), whose norm is the largest singular
    value of the kernel's 2-D DFT over all frequencies.
    """
    w = op.weight.detach().double()
    if op.norm is not None:
        w = w / op.norm.std.double().view(1, -1, 1, 1)
    _, h, wd = op.in_shape
    (sh, sw) = op.layer.stride
    k = _polyphase_kernel(w, op.layer.stride, op.layer.padding)
    size = (-(-h // sh) + k.shape[2] + 1, -(-wd // sw) + k.shape[3] + 1)
    spectrum = torch.fft.fft2(k, s=size)  # [co, ci*s*s, N, M]
    return torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max()


def _dense_norm_exact(op: AffineOp) -> Tensor:
    w = op.weight.detach().double()
    if op.norm is not None:  # Normalize before Linear: scale every flattened input by 1/std of its channel
        scale = (1.0 / op.norm.std.double()).expand(op.in_shape).reshape(1, -1)
        w = w * scale
    return torch.linalg.matrix_norm(w, ord=2)


# Backward-stable SVD/FFT errors are ~1e-13 relative in float64; 1e-9 covers them with room.
_ROUNDING_SLACK = 1e-9


def global_bound(model: nn.Sequential, method: str = "power", iters: int = 1, update: bool = True
                 ) -> GlobalBound:
    """Global Lipschitz bound of the penultimate features: per-layer norms and their product.

    method="power": ``iters`` power iterations per layer, warm-started from the
      vectors kept in the model's buffers (updated when ``update``); differentiable
      (training). An estimate from below.
    method="guaranteed": certified upper bounds (no gradient, float64).
    """
    ops, _ = network_layers(model)
    hidden = ops[:-1]
    if method == "guaranteed":
        with torch.no_grad():
            norms = torch.stack([(_conv_norm_upper(op) if isinstance(op.layer, nn.Conv2d)
                                  else _dense_norm_exact(op)) * (1 + _ROUNDING_SLACK) for op in hidden])
        dtype = ops[0].weight.dtype
        norms = norms.to(dtype) if dtype == torch.float64 else norms.to(dtype) * (1 + 1e-6)
        return GlobalBound(norms, norms.prod(), GUARANTEED, method)
    if method != "power":
        raise ValueError(f"unknown global bound method {method!r}; use 'power' or 'guaranteed'")
    vectors = model.power_vectors() if hasattr(model, "power_vectors") else None
    norms = []
    for i, op in enumerate(hidden):
        if vectors is not None:
            v0 = vectors[i].view(1, *op.in_shape).to(op.weight.dtype)
        else:
            v0 = torch.randn((1,) + op.in_shape, dtype=op.weight.dtype, device=op.weight.device)
        res = masked_operator_norm(op, None, None, v0, max_iter=iters, tol=0.0)
        if update and vectors is not None:
            vectors[i].copy_(res.vector.reshape(-1))
        norms.append(res.sigma[0])
    norms = torch.stack(norms)
    return GlobalBound(norms, norms.prod(), ESTIMATE, method)


# --------------------------------------------------------------------------- local bound


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
    guarantee: str = ESTIMATE

    def fixed_fraction(self) -> float:
        total = sum(m[0].numel() for m in self.masks) * self.masks[0].shape[0]
        varying = sum(float(m.sum()) for m in self.masks)
        return 1.0 - varying / max(total, 1)


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


def local_bound(model: nn.Sequential, x: Tensor, eps: Union[float, Tensor], *, max_iter: int = 100,
                tol: float = 1e-4, init: str = "global", generator: Optional[torch.Generator] = None,
                work_dtype: Optional[torch.dtype] = None, method: str = "power") -> LocalBound:
    """Local Lipschitz bound of the penultimate features on B(x, eps), per sample.

    init="global": power iteration starts from the model's global singular
      vectors (training: few iterations suffice); init="random": from a seeded
      Gaussian (certification: nothing tuned on the evaluated points).
    Differentiable when grad is enabled (norms as v^T-detached sigma).
    ``work_dtype``: dtype of the power iterations (see ``masked_operator_norm``).
    method="power" (fixed or tolerance-stopped power iteration) or "lanczos"
    (restarted Lanczos to ``tol``; far fewer operator applications).
    """
    if method not in ("power", "lanczos"):
        raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}")
    ops, acts = network_layers(model)
    expected = tuple(ops[0].in_shape)
    if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"input of shape {tuple(x.shape)} does not match the model's input {expected}")
    eps_b = _as_batch_eps(eps, x)
    vectors = model.power_vectors() if (init == "global" and hasattr(model, "power_vectors")) else None
    if init not in ("global", "random"):
        raise ValueError("init must be 'global' or 'random'")

    h = x  # clean activation
    lo, hi = x - _bcast(eps_b, x), x + _bcast(eps_b, x)  # box of h_{l-1}
    radius = eps_b  # r_{l-1}: l2 radius of h_{l-1} around its clean value
    col_mask: Optional[Tensor] = None  # O_{l-1} (None = all ones)
    norms, pre_bounds, masks, iterations = [], [], [], []
    converged = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for l, (op, act) in enumerate(zip(ops[:-1], acts)):
        z = op.forward(h)
        # IBP: center/radius through W and |W|.
        z_ibp_c, z_ibp_r = op.forward((lo + hi) / 2), op.abs_linear((hi - lo) / 2)
        # Ball: |z_k(x') - z_k(x)| <= r_{l-1} ||row_k(W O_{l-1})||.
        z_ball_r = _bcast(radius, z) * op.row_norms(col_mask)
        lb = torch.maximum(z_ibp_c - z_ibp_r, z - z_ball_r)
        ub = torch.minimum(z_ibp_c + z_ibp_r, z + z_ball_r)
        row_mask, out_mask = _act_masks(act, lb, ub)
        if vectors is not None:
            v0 = vectors[l].view(1, *op.in_shape).to(x.dtype).expand(x.shape[0], *op.in_shape)
        else:
            v0 = torch.randn((x.shape[0],) + op.in_shape, generator=generator, dtype=x.dtype,
                             device="cpu" if generator is None else generator.device).to(x.device)
        norm_fn = masked_operator_norm_lanczos if method == "lanczos" else masked_operator_norm
        res = norm_fn(op, col_mask, row_mask, v0, max_iter=max_iter, tol=tol, work_dtype=work_dtype)
        norms.append(res.sigma)
        iterations.append(res.iterations)
        converged &= res.converged
        radius = radius * res.sigma
        h = act(z)
        lo, hi = _act_interval(act, lb, ub)
        pre_bounds.append((lb, ub))
        masks.append(out_mask)
        col_mask = out_mask
    layer_norms = torch.stack(norms, dim=1)
    lipschitz = layer_norms.prod(dim=1)
    logits = ops[-1].forward(h)
    return LocalBound(lipschitz=lipschitz, layer_norms=layer_norms, radius=radius, features=h.flatten(1),
                      feature_lower=lo.flatten(1), feature_upper=hi.flatten(1),
                      feature_mask=col_mask.flatten(1), logits=logits, pre_bounds=pre_bounds, masks=masks,
                      iterations=iterations, converged=converged)


# --------------------------------------------------------------------------- last layer


def _last_layer(model: nn.Sequential) -> nn.Linear:
    ops, _ = network_layers(model)
    return ops[-1].layer


def margin_lower_bounds(weight: Tensor, bias: Optional[Tensor], features: Tensor, radius: Tensor,
                        y: Tensor, *, feature_mask: Optional[Tensor] = None,
                        lower: Optional[Tensor] = None, upper: Optional[Tensor] = None,
                        mode: str = "ball", bisection_steps: int = 30) -> Tensor:
    """Lower bounds of the margins z_y - z_j over the reachable penultimate features.

    The features lie in the ball ||h - features|| <= radius (only coordinates
    where ``feature_mask`` is 1 move) and, for mode="ball_box", also in the box
    [lower, upper] (BCP, Lee et al. 2020). Returns [B, C] with 0 in column y.

    ball:     c.h - radius * ||mask * c||,  c = w_y - w_j.
    ball_box: the best of the ball bound, the box bound, and the Lagrangian dual
              g(t) = min_{h in box} c.h + ||h - h0||^2/(2t) - radius^2/(2t),
              which by weak duality is a valid lower bound for *every* t > 0; t is
              chosen by bisection so that the minimiser sits on the sphere.
    """
    if mode not in ("ball", "ball_box"):
        raise ValueError(f"unknown last-layer mode {mode!r}")
    w_y = weight[y]  # [B, d]
    c = w_y[:, None, :] - weight[None, :, :]  # [B, C, d]
    db = 0 if bias is None else bias[y][:, None] - bias[None, :]
    h0 = features[:, None, :]
    clean = (c * h0).sum(-1) + db
    cm = c if feature_mask is None else c * feature_mask[:, None, :]
    cnorm = cm.norm(dim=-1)
    r = radius[:, None]
    best = clean - r * cnorm
    if mode == "ball_box":
        if lower is None or upper is None:
            raise ValueError("ball_box needs the feature box (lower, upper)")
        lo, hi = lower[:, None, :], upper[:, None, :]
        box = torch.minimum(c * lo, c * hi).sum(-1) + db
        best = torch.maximum(best, box)
        with torch.no_grad():
            # Bisection in log t for ||clip(h0 - t c, lo, hi) - h0|| = r (nondecreasing in t).
            positive = (r > 0) & (cnorm > 0)
            t_lo = torch.where(positive, r / cnorm.clamp_min(1e-30), torch.ones_like(cnorm))
            t_hi = t_lo * 1e6
            def reach(t):
                return (torch.clamp(h0 - t[..., None] * c, lo, hi) - h0).square().sum(-1)
            r2 = r.square()
            for _ in range(bisection_steps):
                mid = (t_lo * t_hi).sqrt()
                inside = reach(mid) <= r2
                t_lo = torch.where(inside, mid, t_lo)
                t_hi = torch.where(inside, t_hi, mid)
        for t in (t_lo, t_hi):
            t = t.detach()
            hm = torch.clamp(h0 - t[..., None] * c, lo, hi)
            g = (c * hm).sum(-1) + ((hm - h0).square().sum(-1) - r.square()) / (2 * t) + db
            best = torch.where(positive, torch.maximum(best, g), best)
    onehot = F.one_hot(y, weight.shape[0]).bool()
    return best.masked_fill(onehot, 0.0)


def local_margins(model: nn.Sequential, lb: LocalBound, y: Tensor, mode: str = "ball_box") -> Tensor:
    """Margin lower bounds [B, C] for labels y from a ``LocalBound``."""
    last = _last_layer(model)
    return margin_lower_bounds(last.weight, last.bias, lb.features, lb.radius, y,
                               feature_mask=lb.feature_mask, lower=lb.feature_lower, upper=lb.feature_upper,
                               mode=mode)


def global_margins(model: nn.Sequential, logits: Tensor, features: Tensor, y: Tensor,
                   lipschitz: Tensor, eps: Union[float, Tensor]) -> Tensor:
    """GloRo margins z_y - z_j - eps K ||w_y - w_j|| [B, C] (0 in column y)."""
    last = _last_layer(model)
    eps_b = _as_batch_eps(eps, features)
    return margin_lower_bounds(last.weight, last.bias, features, eps_b * lipschitz, y, mode="ball")


def worst_case_logits(logits: Tensor, margins: Tensor, y: Tensor) -> Tensor:
    """Logits with every other class at its worst case: z~_j = z_y - m_j, z~_y = z_y."""
    z_y = logits.gather(1, y[:, None])
    return z_y - margins


def bottom_logit(logits: Tensor, margins: Tensor, y: Tensor) -> Tensor:
    """GloRo's ⊥ logit max_{j != y} (z_y - m_j), appended as class C: [B, C+1]."""
    z_y = logits.gather(1, y[:, None])
    other = (z_y - margins).masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return torch.cat([logits, other.max(dim=1, keepdim=True).values], dim=1)


def worst_margin(margins: Tensor, y: Tensor) -> Tensor:
    """min_{j != y} m_j per sample."""
    return margins.masked_fill(F.one_hot(y, margins.shape[1]).bool(), float("inf")).min(dim=1).values


def penultimate(model: nn.Sequential, x: Tensor) -> Tensor:
    """Clean penultimate features h_{L-1} (flattened) of x."""
    ops, acts = network_layers(model)
    h = x
    for op, act in zip(ops[:-1], acts):
        h = act(op.forward(h))
    return h.flatten(1)
