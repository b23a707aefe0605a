"""The certification cascade: global -> box -> (screen, exact / probabilistic masked norms).

* it certifies a superset of the global and box steps, on random nets;
* the screen (masked norms estimated from below) never excludes a point that the full
  sound computation certifies (property test against every level for every point);
* networks with dead layers (every neuron of a layer fixed for some or all samples)
  certify at every level, for ``certify``, ``local_bound`` and ``certified_radius``;
* every certified point records the step that certified it and whether it is deterministic.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from locallip.attack import pgd_l2
from locallip.bounds import box_bound, global_bound, local_bound, local_margins, worst_margin
from locallip.certify import STEP, STEPS, certified_radius, certify
from locallip.nn.activations import make_activation
from locallip.nn.models import LipschitzNet

DT = torch.float64
LEVELS = ("probabilistic", "exact", "estimate")
pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")


def _net(seed: int, act: str = "relu", conv: bool = False, scale: float = 1.0) -> LipschitzNet:
    torch.manual_seed(seed)
    if conv:
        mods = [nn.Conv2d(1, 4, 3, padding=1), make_activation(act, (4, 4, 4)), nn.Flatten(),
                nn.Linear(64, 12), make_activation(act, (12,)), nn.Linear(12, 3)]
    else:
        mods = [nn.Flatten(), nn.Linear(16, 20), make_activation(act, (20,)), nn.Linear(20, 12),
                make_activation(act, (12,)), nn.Linear(12, 3)]
    net = LipschitzNet(*mods, input_shape=(1, 4, 4), num_classes=3).to(DT).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _labels(net, x, seed):
    """Mostly the prediction, some points deliberately wrong (misclassified points are never certified)."""
    y = net(x).argmax(1)
    flip = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.2
    return torch.where(flip, (y + 1) % 3, y)


def _box_certified(net, x, y, eps) -> torch.Tensor:
    g = global_bound(net)
    lb = box_bound(net, x, eps, global_norms=g.layer_norms)
    pred = net(x).argmax(1)
    w = worst_margin(local_margins(net, lb, pred), pred)
    return (w > 0) & (pred == y)


CASES = [(seed, act, conv) for seed in range(3) for act in ("relu", "clipped_relu", "clipped_maxmin")
         for conv in (False, True)]


@pytest.mark.parametrize("seed,act,conv", CASES)
@pytest.mark.parametrize("level", LEVELS)
def test_cascade_certifies_a_superset_of_the_global_and_box_steps(seed, act, conv, level):
    net = _net(seed, act, conv)
    x = _x(48, seed)
    y = _labels(net, x, seed)
    for eps in (0.02, 0.1, 0.3):
        glob = certify(net, x, y, eps, "global")
        box = _box_certified(net, x, y, eps)
        c = certify(net, x, y, eps, guarantee=level, generator=torch.Generator().manual_seed(0))
        assert not (glob.certified & ~c.certified).any(), (eps, level)
        assert not (box & ~c.certified).any(), (eps, level)
        assert not (c.certified & ~c.correct).any()
        # every certified point names a certifying step; the counts add up
        names = c.step_names()
        for i in range(x.shape[0]):
            if bool(c.certified[i]):
                assert names[i] in STEPS[:5]
            elif not bool(c.correct[i]):
                assert names[i] in ("misclassified", "global", "box", "exact", "probabilistic", "estimate")
        assert sum(c.step_counts().values()) == int(c.certified.sum())
        det = c.step_counts()["global"] + c.step_counts()["box"] + c.step_counts()["exact"]
        assert int(c.deterministic[c.certified].sum()) == det


@pytest.mark.parametrize("seed,act,conv", CASES)
def test_the_screen_never_drops_a_point_the_sound_computation_certifies(seed, act, conv):
    """Property: compute every sound level for every point (no cascade); the cascade certifies each
    point any of them certifies (up to the probabilistic level's own randomness, checked exactly for
    the exact level), and every point the screen excluded fails every sound level."""
    net = _net(seed, act, conv, scale=1.3)
    x = _x(64, 10 + seed)
    y = net(x).argmax(1)
    for eps in (0.05, 0.15, 0.4):
        full_exact = certify(net, x, y, eps, guarantee="exact", cascade=False,
                             generator=torch.Generator().manual_seed(1))
        full_prob = certify(net, x, y, eps, guarantee="probabilistic", cascade=False,
                            generator=torch.Generator().manual_seed(2))
        casc_exact = certify(net, x, y, eps, guarantee="exact", generator=torch.Generator().manual_seed(3))
        casc = certify(net, x, y, eps, generator=torch.Generator().manual_seed(4))
        excluded = casc.step == STEP["excluded"]
        assert not (excluded & full_exact.certified).any(), eps
        assert not (excluded & full_prob.certified).any(), eps
        assert not ((casc_exact.step == STEP["excluded"]) & full_exact.certified).any(), eps
        assert not (full_exact.certified & ~casc_exact.certified).any(), eps
        # the cascade's sound step proves exactly where the full exact level proves: same points
        assert not (full_exact.certified & ~casc.certified).any(), eps


def _dead_net(seed: int, conv: bool = False) -> LipschitzNet:
    """A net whose first hidden layer is dead (every ReLU off on the ball) for inputs with a large
    first pixel and alive for the others: mixed batches have fully fixed layers for some samples only."""
    net = _net(seed, "relu", conv)
    with torch.no_grad():
        first = net[0] if conv else net[1]
        first.weight.abs_().add_(0.05).mul_(-1.0)  # negative weights: the outputs fall as the input grows
        first.bias.fill_(0.6 if not conv else 0.3)
    return net


def _mixed_inputs(n: int, seed: int) -> torch.Tensor:
    x = _x(n, seed)
    x[: n // 2] += 3.0  # these drive every neuron of the first layer far below 0: dead
    return x


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("cascade", [True, False])
def test_dead_layers_certify_at_every_level(conv, level, cascade):
    net = _dead_net(0, conv)
    x = _mixed_inputs(16, 0)
    y = net(x).argmax(1)
    first = net[0] if conv else net[1]
    dead = (first(x if conv else x.flatten(1)).flatten(1) + 1.0 < 0).all(1)
    assert dead[:8].all() and not dead[8:].any()  # the fixture does what it says
    for eps in (0.1, 0.5):
        lb = local_bound(net, x, eps, guarantee=level, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(lb.lipschitz).all()
        assert (lb.lipschitz[:8] == 0).all()  # a dead layer makes the map constant on the ball
        c = certify(net, x, y, eps, guarantee=level, cascade=cascade, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(c.worst_margin).all()
        # constant on the ball: every correctly classified point with a positive clean margin is robust
        assert c.certified[:8].all(), (eps, c.step_names())
    r = certified_radius(net, x, y, guarantee=level, max_radius=2.0, cascade=cascade,
                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(r).all() and (r[:8] == 2.0).all()


@pytest.mark.parametrize("level", LEVELS)
def test_random_nets_with_layers_fixed_for_some_samples(level):
    """Property test over random nets: some layers fully fixed for some samples and not others."""
    for seed in range(4):
        net = _dead_net(seed, conv=bool(seed % 2))
        x = _mixed_inputs(12, 100 + seed)
        y = net(x).argmax(1)
        for eps in (0.05, 0.3):
            lb = local_bound(net, x, eps, guarantee=level, generator=torch.Generator().manual_seed(seed))
            assert torch.isfinite(lb.lipschitz).all() and (lb.lipschitz >= 0).all()
            for cascade in (True, False):
                c = certify(net, x, y, eps, guarantee=level, cascade=cascade,
                            generator=torch.Generator().manual_seed(seed))
                assert torch.isfinite(c.worst_margin).all()
                assert c.certified[:6].all()
        r = certified_radius(net, x, y, guarantee=level, max_radius=1.0, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(r).all() and (r >= 0).all()


def test_every_certified_point_of_the_cascade_survives_pgd():
    net = _net(7, "clipped_relu", conv=True, scale=1.2)
    x = _x(64, 7)
    y = net(x).argmax(1)
    for eps in (0.05, 0.2):
        c = certify(net, x, y, eps, generator=torch.Generator().manual_seed(0))
        if not c.certified.any():
            continue
        with torch.enable_grad():
            m = pgd_l2(net, x[c.certified], y[c.certified], eps, steps=50, restarts=3,
                       generator=torch.Generator().manual_seed(0))
        assert (m > 0).all()


@pytest.mark.parametrize("seed,act,conv", CASES[::3])
def test_the_screen_margin_is_never_below_a_sound_margin(seed, act, conv):
    """What the screen's exclusions and ``certified_radius``'s tolerance rest on: at any radius, the
    screen's worst margin (masked norms from below, global margins) is at least the whole sound
    cascade's (global, box and sound masked steps) and the single sound levels'."""
    from locallip.bounds import global_margins, top_singular_vectors
    from locallip.bounds.localbound import clean_pass
    from locallip.certify.cascade import screen_worst_margin

    net = _net(seed, act, conv, scale=1.3)
    x = _x(48, 20 + seed)
    pred = net(x).argmax(1)
    g = global_bound(net, method="guaranteed")
    starts = top_singular_vectors(net, tuple(x.shape[1:]))
    clean = clean_pass(net, x)
    for eps in (0.05, 0.2, 0.6):
        e = torch.full((x.shape[0],), eps, dtype=DT)
        screen = screen_worst_margin(net, x, pred, e, global_margins(net, clean.logits, clean.features, pred,
                                                                      g.lipschitz, e), clean, starts)
        for level, cascade in (("exact", True), ("probabilistic", True), ("exact", False), ("probabilistic", False)):
            c = certify(net, x, pred, eps, guarantee=level, cascade=cascade, global_result=g,
                        generator=torch.Generator().manual_seed(0))
            sound = c.worst_margin
            assert (screen >= sound - 1e-9 * (1 + sound.abs())).all(), (eps, level, cascade,
                                                                        (sound - screen).max())


@pytest.mark.parametrize("seed,conv", [(3, False), (5, True), (8, False)])
def test_cascade_radius_is_never_smaller_than_the_single_level_radius_beyond_its_tolerance(seed, conv):
    net = _net(seed, "clipped_relu", conv=conv, scale=1.2)
    x = _x(40, seed)
    y = net(x).argmax(1)
    rtol = 0.02
    for level in ("probabilistic", "exact"):
        fast = certified_radius(net, x, y, guarantee=level, max_radius=3.0, rtol=rtol,
                                generator=torch.Generator().manual_seed(0))
        slow = certified_radius(net, x, y, guarantee=level, max_radius=3.0, rtol=rtol, cascade=False,
                                generator=torch.Generator().manual_seed(0))
        assert (fast >= slow * (1 - 2 * rtol) - 1e-12).all(), (level, (fast / slow.clamp_min(1e-12)).min())
        # and a radius the cascade returns is one it certifies
        ok = fast > 0
        c = certify(net, x[ok], y[ok], fast[ok].to(DT), guarantee=level, generator=torch.Generator().manual_seed(1))
        assert c.certified.all()


def test_masked_false_stops_after_the_box_step():
    net = _net(1, "clipped_relu")
    x = _x(32, 1)
    y = net(x).argmax(1)
    c = certify(net, x, y, 0.2, masked=False)
    assert set(c.step_names()) <= {"global", "box", "misclassified", "not_certified"}
    assert c.deterministic[c.certified].all()
    assert (c.certified == _box_certified(net, x, y, 0.2) | certify(net, x, y, 0.2, "global").certified).all()
