"""The audit's margin attack is at least as strong as the PGD it replaced, and cheaper.

A certificate is planted that is false on purpose: the guaranteed global Lipschitz bound of a
small trained CNN divided by 5, so the global certificate claims points that are not robust.
Both attacks, with the audit's settings, attack every planted certificate; the margin attack
must break at least as many as PGD (and some), in fewer passes through the model.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from locallip.attack import audit_l2, margin_attack_l2
from locallip.bounds import global_bound
from locallip.certify import certify
from locallip.foundation.schema import AttackConfig, AttackMethod
from locallip.nn.activations import make_activation
from locallip.nn.models import LipschitzNet
from net_helpers import fit_briefly

pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")

CLASSES = 10
SHRINK = 5.0  # the planted bound: the guaranteed one divided by this
EPS = 0.6


def _clusters(n: int, seed: int):
    """Ten noisy clusters in [0, 1]^(1x8x8) (fixed centres)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(100))
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centers[y] + 0.3 * torch.randn(n, 1, 8, 8, generator=g), y


def _trained_cnn() -> LipschitzNet:
    torch.manual_seed(0)
    net = LipschitzNet(nn.Conv2d(1, 8, 3, padding=1), make_activation("relu", (8, 8, 8)),
                       nn.Conv2d(8, 16, 3, stride=2, padding=1), make_activation("relu", (16, 4, 4)), nn.Flatten(),
                       nn.Linear(256, 32), make_activation("relu", (32,)), nn.Linear(32, CLASSES),
                       input_shape=(1, 8, 8), num_classes=CLASSES)
    x, y = _clusters(256, 0)
    fit_briefly(net, x, y, steps=60, lr=1e-2)
    return net.double().eval()


def test_margin_attack_catches_at_least_as_many_planted_false_certificates_as_pgd():
    net = _trained_cnn()
    x, y = _clusters(96, 1)
    x = x.double()
    g = global_bound(net, method="guaranteed", input_shape=(1, 8, 8))
    planted = dataclasses.replace(g, lipschitz=g.lipschitz / SHRINK, cache={}, vectors=None)
    claimed = certify(net, x, y, EPS, "global", global_result=planted).certified
    sound = certify(net, x, y, EPS, "global", global_result=g).certified
    idx = claimed.nonzero().squeeze(1)
    assert idx.numel() > 40, "too few planted certificates for the comparison to mean anything"
    settings = AttackConfig()  # the audit's own settings
    passes = {}
    broken = {}
    for method in (AttackMethod.pgd, AttackMethod.margin):
        passes[method] = {"passes": 0}
        with torch.enable_grad():
            m = audit_l2(net, x[idx], y[idx], EPS, dataclasses.replace(settings, method=method),
                         generator=torch.Generator().manual_seed(0), work_dtype=torch.float32, stats=passes[method])
        hit = torch.zeros_like(claimed)
        hit[idx] = m <= 0
        assert not (hit & sound).any(), "an attack broke a sound certificate"
        broken[method] = int(hit.sum())
    assert broken[AttackMethod.pgd] > 0
    assert broken[AttackMethod.margin] >= broken[AttackMethod.pgd], broken
    assert passes[AttackMethod.margin]["passes"] < passes[AttackMethod.pgd]["passes"], passes


def test_margin_attack_returns_a_margin_the_model_takes_inside_the_ball():
    """What the margin attack reports is the float64 model's margin at a point it found in the ball:
    never below the true worst case (the sound global certificate's worst margin)."""
    net = _trained_cnn()
    x, y = _clusters(32, 2)
    x = x.double()
    g = global_bound(net, method="guaranteed", input_shape=(1, 8, 8))
    for eps in (0.0, 0.3, 1.2):
        with torch.enable_grad():
            m = margin_attack_l2(net, x, y, eps, generator=torch.Generator().manual_seed(0), work_dtype=torch.float32)
        assert m.dtype == torch.float64 and m.shape == (32,)
        cert = certify(net, x, y, eps, "global", global_result=g)
        assert torch.all(cert.worst_margin <= m + 1e-9)
        if eps == 0.0:
            with torch.no_grad():
                z = net(x)
            clean = z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], float("-inf")).max(1).values
            assert torch.equal(m, clean)


def test_early_stop_leaves_no_point_unattacked_and_stops_broken_points():
    """Every point is attacked (a stats count per point), and a point broken at once costs few passes."""
    net = _trained_cnn()
    x, y = _clusters(16, 3)
    x = x.double()
    stats = {}
    with torch.enable_grad():
        m = audit_l2(net, x, y, 3.0, AttackConfig(), generator=torch.Generator().manual_seed(0), stats=stats)
    assert torch.all(m <= 0), "radius 3 on 8x8 inputs in [0, 1] should break every point"
    assert 16 <= stats["passes"] < 16 * 5 * 51 // 4
    empty = margin_attack_l2(net, x[:0], y[:0], 0.5, work_dtype=torch.float32)
    assert empty.shape == (0,)
