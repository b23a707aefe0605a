"""The linear relaxation (``bounds.linear_relaxation``): sound, and never looser than what it starts from.

* soundness on small random nets (dense and conv; ReLU, clipped ReLU, MaxMin, clipped MaxMin with
  thresholds that bind inside the balls): no margin lower
  bound above the smallest margin found by dense sampling in the ball plus a per-margin PGD;
* exactness of the check on 2-D inputs with one hidden layer: the minimum of the (piecewise-linear)
  margin over the disc is found exactly, as the least value over the candidate points
  (kink-line crossings inside the disc, kink lines meeting the circle, and, for every linear
  piece, the point of the circle its gradient points away from);
* tightness: margins >= the box bound's ``local_margins``, tightened boxes inside the start boxes,
  alpha-CROWN >= plain, exact at radius 0, the receptive-field path equal to the dense one;
* the check can fail: a relaxation with a wrong intercept is caught.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import locallip.bounds.linear_relaxation as lr_mod
import locallip.bounds.relaxations as relax_mod
from locallip.bounds import box_bound, local_margins
from locallip.bounds.empirical import random_points_in_ball
from locallip.bounds.linear_relaxation import LinearRelaxation, linear_relaxation_margins
from locallip.nn.activations import ClippedMaxMin, ClippedReLU, MaxMin, make_activation

DT = torch.float64
pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")


def _thetas(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Small random clipping levels, so that saturation happens inside the balls."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ClippedReLU):
                m.theta.copy_(0.1 + 0.6 * torch.rand(m.theta.shape, generator=gen))
            elif isinstance(m, ClippedMaxMin):
                m.theta_hi.copy_(0.1 + 0.6 * torch.rand(m.theta_hi.shape, generator=gen))
                m.theta_lo.copy_(0.1 + 0.6 * torch.rand(m.theta_lo.shape, generator=gen))
    return model


def dense_net(act: str, seed: int, d: int = 6) -> nn.Sequential:
    torch.manual_seed(seed)
    act_of = (lambda n: nn.ReLU()) if act == "torch_relu" else (lambda n: make_activation(act, (n,)))
    m = nn.Sequential(nn.Flatten(), nn.Linear(d, 10), act_of(10), nn.Linear(10, 8), act_of(8), nn.Linear(8, 4))
    return _thetas(m.to(DT), torch.Generator().manual_seed(seed))


def conv_net(act: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), make_activation(act, (4, 4, 4)),
                      nn.Conv2d(4, 6, 3, stride=2, padding=1), make_activation(act, (6, 2, 2)), nn.Flatten(),
                      nn.Linear(24, 8), make_activation(act, (8,)), nn.Linear(8, 3))
    return _thetas(m.to(DT), torch.Generator().manual_seed(seed))


def _margins_at(model, pts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[n, B, C] margins z_y - z_j at points [n, B, ...]."""
    z = model(pts.flatten(0, 1)).view(pts.shape[0], pts.shape[1], -1)
    return z.gather(2, y.view(1, -1, 1).expand(pts.shape[0], -1, 1)) - z


def _pgd_per_margin(model, x, y, eps: float, steps: int = 40, restarts: int = 3) -> torch.Tensor:
    """[B, C] smallest z_y - z_j found by PGD on each margin separately (normalized steps, l2 projection)."""
    b, c = x.shape[0], _margins_at(model, x[None], y).shape[2]
    xs, ys = x.repeat_interleave(c, 0), y.repeat_interleave(c)
    js = torch.arange(c).repeat(b)
    gen = torch.Generator().manual_seed(3)
    best = torch.full((b * c,), math.inf, dtype=DT)
    for r in range(restarts):
        delta = torch.zeros_like(xs) if r == 0 else random_points_in_ball(xs, eps, 1, gen)[0] - xs
        for _ in range(steps):
            delta.requires_grad_(True)
            z = model(xs + delta)
            m = z.gather(1, ys[:, None])[:, 0] - z.gather(1, js[:, None])[:, 0]
            g, = torch.autograd.grad(m.sum(), delta)
            with torch.no_grad():
                best = torch.minimum(best, m)
                g = g / g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
                delta = delta - 0.15 * eps * g
                n = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
                delta = delta * (eps * (1 - 1e-12) / n).clamp(max=1.0)
    return best.view(b, c).detach()


def _empirical_min(model, x, y, eps: float, samples: int = 3000) -> torch.Tensor:
    pts = random_points_in_ball(x, eps, samples, torch.Generator().manual_seed(7))
    with torch.no_grad():
        sampled = _margins_at(model, pts, y).min(dim=0).values
    return torch.minimum(sampled, _pgd_per_margin(model, x, y, eps))


CASES = [("dense", "relu"), ("dense", "torch_relu"), ("dense", "clipped_relu"), ("dense", "maxmin"),
         ("dense", "clipped_maxmin"), ("conv", "relu"), ("conv", "clipped_relu"), ("conv", "maxmin"),
         ("conv", "clipped_maxmin")]


@pytest.mark.parametrize("kind,act", CASES)
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_never_above_the_smallest_margin_found(kind, act, eps):
    model = dense_net(act, seed=1) if kind == "dense" else conv_net(act, seed=1)
    x = torch.rand((6, 1, 6) if kind == "dense" else (6, 1, 7, 7), generator=torch.Generator().manual_seed(2),
                   dtype=DT)
    y = model(x).argmax(1)
    bound = linear_relaxation_margins(model, x, y, eps)
    found = _empirical_min(model, x, y, eps)
    assert bool((bound <= found).all()), float((bound - found).max())


def _kink_lines(act, w: torch.Tensor, b: torch.Tensor):
    """(normal, offset) of every line where the hidden layer's activation changes piece."""
    if isinstance(act, ClippedMaxMin):  # a = b, and a or b at theta_hi or at -theta_lo
        half = w.shape[0] // 2
        th, tl = act.theta_hi.detach(), act.theta_lo.detach()
        return (torch.cat([w[:half] - w[half:], w, w, w, w]),
                torch.cat([b[:half] - b[half:], b[:half] - th, b[half:] - th, b[:half] + tl, b[half:] + tl]))
    if isinstance(act, MaxMin):
        half = w.shape[0] // 2
        return w[:half] - w[half:], b[:half] - b[half:]
    if isinstance(act, ClippedReLU):
        theta = act.theta.detach()
        return torch.cat([w, w]), torch.cat([b, b - theta])
    return w, b


def _piece_jacobians(act, n: int):
    """Every d act / d z a linear piece of the activation can have."""
    if isinstance(act, ClippedMaxMin):  # each output of a pair follows a, b or is constant
        half = n // 2
        for picks in itertools.product(itertools.product([None, 0, 1], repeat=2), repeat=half):
            p = torch.zeros(n, n, dtype=DT)
            for i, (hi_pick, lo_pick) in enumerate(picks):
                if hi_pick is not None:
                    p[i, i + half * hi_pick] = 1.0
                if lo_pick is not None:
                    p[i + half, i + half * lo_pick] = 1.0
            yield p
        return
    if isinstance(act, MaxMin):
        half = n // 2
        for swap in itertools.product([False, True], repeat=half):
            p = torch.zeros(n, n, dtype=DT)
            for i, s in enumerate(swap):
                a, bb = (i + half, i) if s else (i, i + half)
                p[i, a] = p[i + half, bb] = 1.0
            yield p
    else:
        for on in itertools.product([0.0, 1.0], repeat=n):
            yield torch.diag(torch.tensor(on, dtype=DT))


def _exact_min_over_disc(model, x0: torch.Tensor, y: int, eps: float) -> torch.Tensor:
    """[C] exact min over the disc |x - x0| <= eps of z_y - z_j for a 2-input net with one hidden layer."""
    lin1, act, lin2 = model[1], model[2], model[3]
    normals, offsets = _kink_lines(act, lin1.weight.detach(), lin1.bias.detach())
    pts = [x0]
    for (n1, o1), (n2, o2) in itertools.combinations(list(zip(normals, offsets)), 2):  # crossings
        a = torch.stack([n1, n2])
        if abs(float(torch.linalg.det(a))) > 1e-12:
            pts.append(torch.linalg.solve(a, -torch.stack([o1, o2])))
    for n, o in zip(normals, offsets):  # a line meets the circle: foot of the perpendicular +- along the line
        nn_ = float(n.norm())
        dist = -(float(n @ x0) + float(o)) / nn_
        if abs(dist) <= eps:
            foot, along = x0 + dist * n / nn_, torch.stack([-n[1], n[0]]) / nn_
            half = math.sqrt(max(eps * eps - dist * dist, 0.0))
            pts += [foot + half * along, foot - half * along]
    cands = []
    for j in range(lin2.out_features):
        c = torch.zeros(lin2.out_features, dtype=DT)
        c[y] += 1
        c[j] -= 1
        for jac in _piece_jacobians(act, lin1.out_features):  # each linear piece's minimum on the circle
            g = c @ lin2.weight.detach() @ jac @ lin1.weight.detach()
            if float(g.norm()) > 0:
                cands.append(x0 - eps * g / g.norm())
    pts = torch.stack([p for p in pts + cands if float((p - x0).norm()) <= eps * (1 + 1e-12)])
    with torch.no_grad():
        return _margins_at(model, pts[:, None, None, :], torch.tensor([y])).min(dim=0).values[0]


@pytest.mark.parametrize("act", ["relu", "clipped_relu", "maxmin", "clipped_maxmin"])
def test_never_above_the_exact_minimum_on_2d_inputs(act):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 6), make_activation(act, (6,)), nn.Linear(6, 3)).to(DT)
    _thetas(model, torch.Generator().manual_seed(5))
    x = torch.randn(8, 1, 2, generator=torch.Generator().manual_seed(6), dtype=DT) * 0.5
    y = model(x).argmax(1)
    for eps in (0.2, 0.8):
        bound = linear_relaxation_margins(model, x, y, eps)
        exact = torch.stack([_exact_min_over_disc(model, x[b, 0], int(y[b]), eps) for b in range(8)])
        sampled = _empirical_min(model, x, y, eps, samples=2000)
        assert bool((exact <= sampled + 1e-12).all())  # the enumeration finds the minimum
        assert bool((bound <= exact).all()), float((bound - exact).max())
        assert float((exact - bound).max()) > 0  # not vacuous: the check compares distinct values


def _interval_margins(model, pre_bounds, y) -> torch.Tensor:
    """IBP's margins from the last hidden layer's box: sum_k min(c_k lo_k, c_k hi_k) + c . b."""
    lo, hi = pre_bounds[-1]
    act, last = model[-2], model[-1]
    lo, hi = (torch.relu(lo), torch.relu(hi)) if isinstance(act, nn.ReLU) else act.interval(lo, hi)
    w, b = last.weight.detach(), last.bias.detach()
    c = w[y][:, None, :] - w[None, :, :]  # [B, C, d]
    return (torch.minimum(c * lo.flatten(1)[:, None], c * hi.flatten(1)[:, None]).sum(-1)
            + b[y][:, None] - b[None, :])


@pytest.mark.parametrize("kind,act", CASES)
def test_at_least_as_tight_as_the_box_bound_and_boxes_only_shrink(kind, act):
    model = dense_net(act, seed=4) if kind == "dense" else conv_net(act, seed=4)
    x = torch.rand((5, 1, 6) if kind == "dense" else (5, 1, 7, 7), generator=torch.Generator().manual_seed(8),
                   dtype=DT)
    y = model(x).argmax(1)
    tighter = []
    for eps in (0.05, 0.3):
        box = box_bound(model, x, eps)
        assert bool((linear_relaxation_margins(model, x, y, eps, start=box) >= local_margins(model, box, y)).all())
        from_boxes = linear_relaxation_margins(model, x, y, eps, pre_bounds=box.pre_bounds)
        # IBP computed here carries no rounding allowance; the step's is ~1e-14 on these nets.
        assert bool((from_boxes >= _interval_margins(model, box.pre_bounds, y) - 1e-12).all())
        net = LinearRelaxation(model, tuple(x.shape[1:]))
        tightened, _, _ = net.bounds(x, torch.full((5,), eps, dtype=DT), box.pre_bounds)
        assert all(bool((lo >= lo0).all() and (hi <= hi0).all())
                   for (lo, hi), (lo0, hi0) in zip(tightened, box.pre_bounds))
        tighter.append(any(bool((lo > lo0).any()) for (lo, _), (lo0, _) in zip(tightened, box.pre_bounds)))
    assert any(tighter)  # not vacuous: some box does shrink


def test_alpha_crown_is_never_looser_and_still_sound():
    model = dense_net("relu", seed=9)
    x = torch.rand(6, 1, 6, generator=torch.Generator().manual_seed(9), dtype=DT)
    y = model(x).argmax(1)
    plain = linear_relaxation_margins(model, x, y, 0.5)
    tuned = linear_relaxation_margins(model, x, y, 0.5, alpha_steps=15)
    assert bool((tuned >= plain).all()) and float((tuned - plain).max()) > 0
    assert bool((tuned <= _empirical_min(model, x, y, 0.5)).all())


def test_exact_at_radius_zero():
    model = conv_net("clipped_relu", seed=2)
    x = torch.rand(4, 1, 7, 7, generator=torch.Generator().manual_seed(2), dtype=DT)
    y = model(x).argmax(1)
    with torch.no_grad():
        z = model(x)
    clean = z.gather(1, y[:, None]) - z
    bound = linear_relaxation_margins(model, x, y, 0.0)
    assert bool((bound <= clean).all()) and float((clean - bound).max()) < 1e-9


@pytest.mark.parametrize("act", ["relu", "maxmin", "clipped_maxmin"])
def test_receptive_field_path_equals_the_dense_one(act):
    model = conv_net(act, seed=3)
    if act != "relu":  # rows of layer 1 that miss one member of each pair: their support must add it
        with torch.no_grad():
            model[2].weight[:3, :2] = 0
    x = torch.rand(4, 1, 7, 7, generator=torch.Generator().manual_seed(3), dtype=DT)
    y = model(x).argmax(1)
    net = LinearRelaxation(model, (1, 7, 7))
    assert net.sparse is not None
    fast = linear_relaxation_margins(model, x, y, 0.4, network=net)
    net.sparse = None
    dense = linear_relaxation_margins(model, x, y, 0.4, network=net)
    assert torch.allclose(fast, dense, rtol=0, atol=1e-10)


def test_a_wrong_relaxation_is_caught(monkeypatch):
    """Upper lines without their intercept (through the origin) are not above ReLU: the check finds it."""
    model = dense_net("relu", seed=1)
    x = torch.rand(6, 1, 6, generator=torch.Generator().manual_seed(2), dtype=DT)
    y = model(x).argmax(1)
    real = relax_mod._intercept
    monkeypatch.setattr(relax_mod, "_intercept", lambda slope, lo, hi, theta, lower: real(slope, lo, hi, theta, lower)
                        if lower else torch.zeros_like(slope))
    bound = linear_relaxation_margins(model, x, y, 0.5)
    assert bool((bound > _empirical_min(model, x, y, 0.5)).any())


def test_layers_too_large_to_keep_give_the_same_bounds(monkeypatch):
    """Without the explicit rows W^T e_k (large layers), rows come from one-hot transposes: same bounds."""
    model = conv_net("relu", seed=6)
    x = torch.rand(3, 1, 7, 7, generator=torch.Generator().manual_seed(6), dtype=DT)
    y = model(x).argmax(1)
    kept = LinearRelaxation(model, (1, 7, 7))
    monkeypatch.setattr(lr_mod, "BASIS_MAX_ENTRIES", 10)
    computed = LinearRelaxation(model, (1, 7, 7))
    assert all(b is None for b in computed.basis) and computed.sparse is None
    assert computed.frobenius == pytest.approx(kept.frobenius, rel=1e-12)
    a = linear_relaxation_margins(model, x, y, 0.3, network=kept)
    b = linear_relaxation_margins(model, x, y, 0.3, network=computed)
    assert torch.allclose(a, b, rtol=0, atol=1e-10)
