"""Empirical *lower* bounds of the local Lipschitz constant of the penultimate features.

For f = h_{L-1} (``bounds.penultimate``) and any point x' in the *interior* of
B(x, eps) where f is differentiable, ||J_f(x')||_2 <= Lip(f on B(x, eps)): the
ball is open around x', so the directional derivative along the top singular
vector is a limit of difference quotients of points inside the ball. The
largest Jacobian norm found at points of the ball is therefore a lower bound of
the true local constant, and every sound upper bound (``bounds.local_bound``)
must be at least as large. The networks here are piecewise smooth, so f is
differentiable almost everywhere and random points (which hit a kink with
probability 0) are fine. Points are kept strictly inside the ball.

Used by the tests to check the bounds from the other side; nothing here is
part of a certificate.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.activations import ClippedMaxMin, ClippedReLU, MaxMin, ReLU
from .settings import as_batch_radius as _as_batch_eps
from .margins import penultimate
from .operators import network_layers

Tensor = torch.Tensor


def _single(model: nn.Module, forward):
    def f(xi: Tensor) -> Tensor:
        return forward(model, xi.unsqueeze(0)).squeeze(0)
    return f


def _jacobians(model: nn.Module, x: Tensor, forward=penultimate) -> Tensor:
    """[B, d_out, d_in] Jacobians of ``forward`` at every point of x (vmap over the batch).

    Forward mode when the input is smaller than the output, reverse mode otherwise.
    """
    f = _single(model, forward)
    d_in = x[0].numel()
    d_out = forward(model, x[:1]).shape[1]
    jac_fn = torch.func.jacfwd(f) if d_in < d_out else torch.func.jacrev(f)
    jac = torch.func.vmap(jac_fn)(x)
    return jac.reshape(x.shape[0], d_out, d_in)


def jacobian_norm(model: nn.Module, x: Tensor) -> Tensor:
    """[B] exact spectral norm ||J(x_b)||_2 of the penultimate features' Jacobian w.r.t. the input.

    Batched (vmap of jacfwd/jacrev) and exact (largest singular value by SVD).
    At a point where f is differentiable this is a lower bound of f's Lipschitz
    constant on any open set containing the point.
    """
    with torch.no_grad():
        return torch.linalg.matrix_norm(_jacobians(model, x.detach()), ord=2)


# --------------------------------------------------------------------------- smooth surrogate


def _softplus(t: Tensor, beta: float) -> Tensor:
    return F.softplus(t, beta=beta, threshold=20.0)


def _smooth_act(act: nn.Module, z: Tensor, beta: float) -> Tensor:
    """A smooth approximation of ``act`` (used only to find where ||J|| is large)."""
    if isinstance(act, (ReLU, nn.ReLU)):
        return _softplus(z, beta)
    if isinstance(act, ClippedReLU):  # clip(t, 0, theta) = relu(t) - relu(t - theta) for theta >= 0
        return _softplus(z, beta) - _softplus(z - act.theta, beta)
    if isinstance(act, (MaxMin, ClippedMaxMin)):
        a, b = z.chunk(2, dim=1)
        hi = b + _softplus(a - b, beta)  # max(a, b)
        lo = a + b - hi  # min(a, b)
        if isinstance(act, ClippedMaxMin):
            hi = hi - _softplus(hi - act.theta_hi, beta)  # min(hi, theta_hi)
            lo = lo + _softplus(-act.theta_lo - lo, beta)  # max(lo, -theta_lo)
        return torch.cat([hi, lo], dim=1)
    raise TypeError(f"no smooth surrogate for {type(act).__name__}")


def _smooth_penultimate(beta: float):
    def forward(model: nn.Module, x: Tensor) -> Tensor:
        ops, acts = network_layers(model, input_shape=tuple(x.shape[1:]))
        h = x
        for op, act in zip(ops[:-1], acts):
            h = _smooth_act(act, op.forward(h), beta)
        return h.flatten(1)
    return forward


# --------------------------------------------------------------------------- search in the ball


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    return t.view(-1, *([1] * (like.dim() - 1)))


def _project(x: Tensor, delta: Tensor, eps: Tensor) -> Tensor:
    """x + delta pulled strictly inside B(x, eps)."""
    inside = eps * (1 - 64 * torch.finfo(x.dtype).eps)
    norm = delta.flatten(1).norm(dim=1)
    scale = torch.where(norm > inside, inside / torch.where(norm > 0, norm, torch.ones_like(norm)),
                        torch.ones_like(norm))
    return x + delta * _bcast(scale, delta)


def random_points_in_ball(x: Tensor, eps: Union[float, Tensor], n: int,
                          generator: Optional[torch.Generator] = None) -> Tensor:
    """[n, B, *shape] points strictly inside B(x_b, eps_b): half uniform in the ball, half with a uniform radius."""
    eps_b = _as_batch_eps(eps, x)
    d = torch.randn((n,) + tuple(x.shape), generator=generator, dtype=x.dtype).to(x.device)
    u = torch.rand((n, x.shape[0]), generator=generator, dtype=x.dtype).to(x.device)
    half = n // 2
    u[:half] = u[:half] ** (1.0 / x[0].numel())  # uniform in volume (mostly near the sphere)
    norms = d.flatten(2).norm(dim=2)
    delta = d * (u * eps_b / norms).view(n, x.shape[0], *([1] * (x.dim() - 1)))
    return torch.stack([_project(x, delta[i], eps_b) for i in range(n)])


def empirical_lipschitz(model: nn.Module, x: Tensor, eps: Union[float, Tensor], *, samples: int = 32,
                        ascent_steps: int = 20, generator: Optional[torch.Generator] = None,
                        beta: Tuple[float, float] = (10.0, 1000.0), step_size: float = 0.2) -> Tensor:
    """[B] largest exact ||J(x')||_2 of the penultimate features found at points x' inside B(x_b, eps_b).

    A *lower* bound of the local Lipschitz constant on the ball (see the module
    docstring). Points tried: x itself, ``samples`` random points of the ball,
    and the ``ascent_steps`` iterates of a gradient ascent on ||J|| started from
    the best of them. ReLU-type networks have piecewise-constant Jacobians (the
    gradient of ||J|| is zero almost everywhere), so the ascent direction is
    the gradient of u^T J_s(x') v, where J_s is the Jacobian of the same network
    with smooth activations (softplus, sharpness growing geometrically from
    beta[0] to beta[1]) and u, v are the top singular vectors of the real
    Jacobian at x' (for a smooth net this is the gradient of ||J||). Each step
    is projected into the ball and scored with the exact ||J|| of the real network.
    """
    was_training = model.training
    model.eval()
    x = x.detach()
    eps_b = _as_batch_eps(eps, x)
    best = jacobian_norm(model, x)
    best_x = x.clone()
    if samples > 0 and bool((eps_b > 0).any()):
        pts = random_points_in_ball(x, eps_b, samples, generator)
        norms = jacobian_norm(model, pts.flatten(0, 1)).view(samples, x.shape[0])
        top, arg = norms.max(dim=0)
        better = top > best
        best = torch.where(better, top, best)
        best_x = torch.where(_bcast(better, x), pts[arg, torch.arange(x.shape[0], device=x.device)], best_x)
    if ascent_steps > 0 and bool((eps_b > 0).any()):
        cur = best_x.clone()
        for step in range(ascent_steps):
            frac = step / max(ascent_steps - 1, 1)
            smooth = _smooth_penultimate(beta[0] * (beta[1] / beta[0]) ** frac)
            with torch.no_grad():
                u_s, s_v, vh = torch.linalg.svd(_jacobians(model, cur), full_matrices=False)
            u, v = u_s[:, :, 0], vh[:, 0, :].reshape(cur.shape)

            def objective(xi: Tensor, ui: Tensor, vi: Tensor) -> Tensor:
                _, tangent = torch.func.jvp(_single(model, smooth), (xi,), (vi,))
                return (ui * tangent).sum()

            g = torch.func.vmap(torch.func.grad(objective))(cur, u, v).detach()
            gn = g.flatten(1).norm(dim=1)
            g = g / _bcast(torch.where(gn > 0, gn, torch.ones_like(gn)), g)
            cur = _project(x, cur + _bcast(step_size * eps_b, g) * g - x, eps_b).detach()
            val = jacobian_norm(model, cur)
            better = val > best
            best = torch.where(better, val, best)
            best_x = torch.where(_bcast(better, x), cur, best_x)
    model.train(was_training)
    return best
