"""``certify.gain.local_gain`` on a 2-D input network, where the fixed neurons can be checked by hand
(first layer: the ball bound is exact) and by dense sampling of the ball (every layer)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from locallip.certify import certify
from locallip.certify.gain import fixed_share, local_gain, paired_gain
from locallip.foundation.schema import CertifySettings

RADIUS = 0.1


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    with torch.no_grad():  # second-layer biases below zero: about half its neurons are dead on these balls
        net[2].bias.sub_(0.1)
    return net.eval()


def _points(n: int = 20):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1
    return x, _net()(x).argmax(1)  # labels = predictions: every point can be certified


def _ball_samples(center: torch.Tensor, r: float, k: int = 4000) -> torch.Tensor:
    """Points filling the disk of radius r (a polar grid, the boundary circle included)."""
    radii = torch.linspace(0, r, 40, dtype=torch.float64)
    angles = torch.linspace(0, 2 * math.pi, k // 40 + 1, dtype=torch.float64)
    grid = torch.stack([radii[:, None] * torch.cos(angles), radii[:, None] * torch.sin(angles)], -1).reshape(-1, 2)
    return center + grid


def test_first_layer_share_is_the_hand_count_and_every_layer_is_sound():
    net, (x, _) = _net(), _points()
    out = fixed_share(net, x, RADIUS, CertifySettings(batch_size=7))  # 7 + 7 + 6 points: batches weighted
    assert out["neurons_per_layer"] == [16, 16]
    # Layer 1 by hand: a ReLU is constant (dead) on the ball iff z_i + r ||w_i|| <= 0 (the ball bound is exact).
    w, b = net[0].weight, net[0].bias
    dead = (x @ w.T + b + RADIUS * w.norm(dim=1) <= 0).double()
    assert out["fixed_per_layer"][0] == pytest.approx(float(dead.mean()), abs=1e-12)
    assert out["fixed_box_per_layer"][0] == pytest.approx(float(dead.mean()), abs=1e-12)
    # Every layer: never more fixed than dense sampling of each ball finds, and the masked norms fix at least
    # as many as the box step's global norms.
    empirical = torch.zeros(2, dtype=torch.float64)
    for xi in x:
        h1 = net[0](_ball_samples(xi, RADIUS))
        h2 = net[2](torch.relu(h1))
        empirical += torch.stack([(h1.max(0).values <= 0).double().mean(), (h2.max(0).values <= 0).double().mean()])
    empirical /= x.shape[0]
    assert out["fixed_per_layer"][1] <= float(empirical[1]) + 1e-12
    # Not vacuous: here the masked norms fix more second-layer neurons than the box step, and not all.
    assert out["fixed_box_per_layer"][1] < out["fixed_per_layer"][1] < 1
    assert out["fixed_weighted"] == pytest.approx(sum(out["fixed_per_layer"]) / 2)
    assert out["fixed_mean"] == pytest.approx(sum(out["fixed_per_layer"]) / 2)


def test_fixed_share_grows_as_the_radius_shrinks():
    net, (x, _) = _net(), _points()
    small, large = (fixed_share(net, x, r, CertifySettings())["fixed_per_layer"][0] for r in (0.05, 0.6))
    assert small > large


def test_local_gain_is_local_minus_global_on_the_same_points():
    net, (x, y) = _net(), _points()
    radius = 0.05  # where both certificates certify some points and the local one more
    out = local_gain(net, x, y, radius, CertifySettings(batch_size=8), audit=True)
    glo = certify(net, x, y, radius, "global")
    assert out["n"] == 20 and out["certified_global"] == pytest.approx(float(glo.certified.double().mean()))
    assert out["certified_local"] > out["certified_global"] > 0
    assert out["gain"] == pytest.approx(out["certified_local"] - out["certified_global"])
    assert out["gain_points"] == pytest.approx(100 * out["gain"])
    assert out["gain_of_open"] == pytest.approx(out["gain"] / (out["clean"] - out["certified_global"]))
    assert out["attack_broken"] == 0 and out["attack_checked"] >= round(out["certified_local"] * 20)
    assert len(out["fixed_per_layer"]) == 2


def test_paired_standard_error():
    rows = [{"certified_local": a, "certified_global": b} for a, b in ((1, 0), (1, 1), (0, 0), (1, 0))]
    out = paired_gain(rows)
    assert out["gain"] == 0.5
    assert out["gain_se"] == pytest.approx(math.sqrt(4 * 0.25 / 3 / 4))  # d = 1, 0, 0, 1
