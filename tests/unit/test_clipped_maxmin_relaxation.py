"""The linear relaxation of clipped MaxMin (``bounds.relaxations``, ``_Clamps``) and the step on such nets.

* the lines of every pair's outputs (each sign of nu, both outputs together) lie below the
  function on a dense grid of the pair's box, with thresholds inside the box;
* the margins' lower bounds are never above what sampling plus ``pgd_l2`` finds;
* the step certifies points of a small trained clipped-MaxMin net, and PGD breaks none of them;
* an activation it does not relax still makes the step record that it does not apply.
(The soundness and tightness checks shared with the other activations, the exhaustive 2-D check
included, run in test_linear_relaxation.py.)
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from locallip.attack import pgd_l2
from locallip.bounds import worst_margin
from locallip.bounds.empirical import random_points_in_ball
from locallip.bounds.linear_relaxation import RelaxationNotApplicable, _gamma, linear_relaxation_margins
from locallip.bounds.relaxations import Relaxation
from locallip.certify import STEP, certify
from locallip.nn.activations import ClippedMaxMin, LipschitzActivation, make_activation
from test_linear_relaxation import conv_net, dense_net

DT = torch.float64
pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")


def _pair_boxes(pairs: int, samples: int, seed: int):
    """A ClippedMaxMin layer and boxes of its inputs [samples, 2 pairs] whose intervals contain the thresholds."""
    gen = torch.Generator().manual_seed(seed)
    act = ClippedMaxMin((2 * pairs,)).to(DT).requires_grad_(False)
    with torch.no_grad():
        act.theta_hi.copy_(0.2 + 0.5 * torch.rand(pairs, generator=gen, dtype=DT))
        act.theta_lo.copy_(0.2 + 0.5 * torch.rand(pairs, generator=gen, dtype=DT))
    centre = torch.randn(samples, 2 * pairs, generator=gen, dtype=DT) * 0.5
    width = 0.2 + 1.2 * torch.rand(samples, 2 * pairs, generator=gen, dtype=DT)
    return act, centre - width, centre + width


@pytest.mark.parametrize("seed", [0, 1])
def test_lines_lie_below_the_outputs_on_a_dense_grid_of_the_box(seed):
    """nu . act(z) >= mu . z + const (up to the rounding allowance ``back`` reports) on a 161 x 161 grid of
    each pair's box, for nu on one output (both signs), on both (all four sign pairs) and random."""
    pairs, samples, n = 4, 3, 161
    act, lo, hi = _pair_boxes(pairs, samples, seed)
    relax = Relaxation(act, lo, hi)
    gamma = _gamma(2 * 2 * pairs + 16)
    t = torch.linspace(0, 1, n, dtype=DT)
    directions = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1), (0.7, -0.3), (-0.4, 0.9)]
    saturated = varying = 0
    for s in range(samples):
        for k in range(pairs):
            ia, ib = k, k + pairs
            a = lo[s, ia] + (hi[s, ia] - lo[s, ia]) * t
            b = lo[s, ib] + (hi[s, ib] - lo[s, ib]) * t
            z = lo[s].repeat(n * n, 1)
            z[:, ia], z[:, ib] = a.repeat_interleave(n), b.repeat(n)
            out = act(z)
            at_hi = out[:, k] == act.theta_hi[k]
            saturated, varying = saturated + int(at_hi.any()), varying + int((~at_hi).any())
            nu = torch.zeros(len(directions), 2 * pairs, dtype=DT)
            nu[:, k], nu[:, k + pairs] = torch.tensor(directions, dtype=DT).T
            mu, const, mag = relax.back(nu, s)
            value = out @ nu.T  # [grid, rows]
            line = z @ mu.T + const
            assert bool((value >= line - 2 * gamma * mag).all()), float((line - value).max())
            assert float((value - line).min()) < 1e-2  # the lines are not vacuous: they come close somewhere
    assert saturated and varying  # the thresholds bind on part of the boxes


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_margins_never_above_sampling_and_pgd(kind, eps):
    model = dense_net("clipped_maxmin", seed=11) if kind == "dense" else conv_net("clipped_maxmin", seed=11)
    shape = (8, 1, 6) if kind == "dense" else (8, 1, 7, 7)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(12), dtype=DT)
    y = model(x).argmax(1)
    bound = worst_margin(linear_relaxation_margins(model, x, y, eps), y)
    attacked = pgd_l2(model, x, y, eps, steps=100, restarts=5, generator=torch.Generator().manual_seed(13))
    pts = random_points_in_ball(x, eps, 4000, torch.Generator().manual_seed(14))
    with torch.no_grad():
        z = model(pts.flatten(0, 1)).view(4000, x.shape[0], -1)
    sampled = (z.gather(2, y.view(1, -1, 1).expand(4000, -1, 1)) - z).masked_fill(
        torch.nn.functional.one_hot(y, z.shape[2]).bool()[None], float("inf")).amin(dim=(0, 2))
    assert bool((bound <= attacked).all()) and bool((bound <= sampled).all())


def test_alpha_crown_on_clipped_maxmin_is_never_looser_and_still_sound():
    """alpha tunes MaxMin's relu(a - b) lower slopes (the clamps keep theirs): every bound it keeps is sound."""
    model = dense_net("clipped_maxmin", seed=9)
    x = torch.rand(6, 1, 6, generator=torch.Generator().manual_seed(9), dtype=DT)
    y = model(x).argmax(1)
    plain = linear_relaxation_margins(model, x, y, 0.5)
    tuned = linear_relaxation_margins(model, x, y, 0.5, alpha_steps=15)
    assert bool((tuned >= plain).all()) and float((tuned - plain).max()) > 0
    attacked = pgd_l2(model, x, y, 0.5, steps=100, restarts=5, generator=torch.Generator().manual_seed(13))
    assert bool((worst_margin(tuned, y) <= attacked).all())


def _trained_net() -> nn.Sequential:
    """A small clipped-MaxMin MLP fitted to three Gaussian clusters in 8-D (thresholds low enough to bind)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=gen, dtype=DT)
    y = torch.arange(600) % 3
    x = centres[y] + 0.6 * torch.randn(600, 8, generator=gen, dtype=DT)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 32), make_activation("clipped_maxmin", (32,), 0.5),
                        nn.Linear(32, 32), make_activation("clipped_maxmin", (32,), 0.5), nn.Linear(32, 3)).to(DT)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.input_shape = (8,)
    return net.eval()


def test_every_certificate_the_step_issues_on_a_trained_net_survives_pgd():
    net = _trained_net()
    x = torch.randn(80, 8, generator=torch.Generator().manual_seed(5), dtype=DT)
    y = net(x).argmax(1)
    found = 0
    for eps in (0.1, 0.3, 0.6):
        c = certify(net, x, y, eps, linear_relaxation=True, generator=torch.Generator().manual_seed(0))
        assert "linear_relaxation_not_applicable" not in c.record.steps
        idx = (c.step == STEP["linear_relaxation"]).nonzero().squeeze(1)
        found += idx.numel()
        if idx.numel():
            attacked = pgd_l2(net, x[idx], y[idx], eps, steps=200, restarts=10,
                              generator=torch.Generator().manual_seed(2))
            assert int((attacked <= 0).sum()) == 0  # no certificate broken
    assert found > 0  # the audit is not vacuous


class _Abs(LipschitzActivation):
    """|t|: 1-Lipschitz, not relaxed by the linear relaxation."""

    def forward(self, z):
        return z.abs()

    def interval(self, lb, ub):
        return torch.where((lb < 0) & (ub > 0), torch.zeros_like(lb), torch.minimum(lb.abs(), ub.abs())), \
            torch.maximum(lb.abs(), ub.abs())

    def masks(self, lb, ub):
        ones = torch.ones_like(lb)
        return ones, ones


def test_an_activation_it_does_not_relax_still_skips_the_step():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 20), _Abs(), nn.Linear(20, 3)).to(DT).eval()
    net.input_shape = (8,)
    x = torch.rand(16, 8, generator=torch.Generator().manual_seed(1), dtype=DT)
    with pytest.raises(RelaxationNotApplicable, match="_Abs"):
        linear_relaxation_margins(net, x, net(x).argmax(1), 0.1)
    c = certify(net, x, net(x).argmax(1), 0.5, linear_relaxation=True)
    assert "not supported" in c.record.steps["linear_relaxation_not_applicable"]
