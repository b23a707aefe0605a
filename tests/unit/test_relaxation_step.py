"""The linear-relaxation step at the end of the cascade (``certify(..., linear_relaxation=True)``).

* it certifies at least the union of what the Lipschitz steps and the linear relaxation alone
  certify, points the screen excluded included;
* every certificate it issues survives PGD, and counts as deterministic;
* off (the default), the cascade is what it was; with an activation it does not relax
  (here |t|) it is skipped and the record says so.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from locallip.attack import pgd_l2
from locallip.bounds.linear_relaxation import linear_relaxation_margins
from locallip.bounds import worst_margin
from locallip.certify import STEP, certify
from locallip.nn.activations import ReLU
from test_clipped_maxmin_relaxation import _Abs

DT = torch.float64
pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")


def _net(seed: int, conv: bool) -> nn.Sequential:
    """An ordinary ReLU network (not trained for a Lipschitz bound: its layer norms are large)."""
    torch.manual_seed(seed)
    if conv:
        net = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 20),
                            ReLU(), nn.Linear(20, 3))
        net.input_shape = (1, 8, 8)
    else:
        net = nn.Sequential(nn.Flatten(), nn.Linear(8, 40), ReLU(), nn.Linear(40, 40), ReLU(), nn.Linear(40, 3))
        net.input_shape = (8,)
    return net.to(DT).eval()


def _x(net, n: int, seed: int) -> torch.Tensor:
    return torch.rand((n,) + tuple(net.input_shape), generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("conv", [False, True])
def test_the_step_certifies_the_union_and_survives_pgd(conv):
    net = _net(1 if conv else 0, conv)
    x = _x(net, 64, 1)
    y = net(x).argmax(1)
    found = 0
    for eps in (0.02, 0.05, 0.1) if conv else (0.02, 0.05, 0.15):
        lip = certify(net, x, y, eps, generator=torch.Generator().manual_seed(0))
        both = certify(net, x, y, eps, linear_relaxation=True, generator=torch.Generator().manual_seed(0))
        alone = worst_margin(linear_relaxation_margins(net, x, y, eps), y) > 0
        assert not (lip.certified & ~both.certified).any()
        assert not (alone & ~both.certified).any()
        assert torch.equal(both.step[lip.certified], lip.step[lip.certified])  # cheaper steps decide first
        by_lr = both.step == STEP["linear_relaxation"]
        found += int(by_lr.sum())
        assert both.deterministic[by_lr].all()
        idx = by_lr.nonzero().squeeze(1)
        if idx.numel():
            am = pgd_l2(net, x[idx], y[idx], eps, steps=100, restarts=5, generator=torch.Generator().manual_seed(2))
            assert (am > 0).all()
    assert found > 0  # the relaxation adds points the Lipschitz steps leave


def test_points_the_screen_excluded_can_be_certified_by_the_relaxation():
    net = _net(0, conv=False)
    x = _x(net, 64, 1)
    y = net(x).argmax(1)
    lip = certify(net, x, y, 0.15, generator=torch.Generator().manual_seed(0))
    both = certify(net, x, y, 0.15, linear_relaxation=True, generator=torch.Generator().manual_seed(0))
    excluded = lip.step == STEP["excluded"]
    assert excluded.any()
    assert (both.certified & excluded).any()
    assert both.record.steps["linear_relaxation"] == int((lip.correct & ~lip.robust).sum())


def test_off_by_default_and_skipped_where_it_does_not_apply():
    net = _net(0, conv=False)
    x = _x(net, 32, 1)
    y = net(x).argmax(1)
    c = certify(net, x, y, 0.15)
    assert not (c.step == STEP["linear_relaxation"]).any() and "linear relaxation" not in c.promise
    torch.manual_seed(1)
    other = nn.Sequential(nn.Flatten(), nn.Linear(8, 20), _Abs(), nn.Linear(20, 3))
    other.input_shape = (8,)
    other = other.to(DT).eval()
    c = certify(other, x, other(x).argmax(1), 0.5, linear_relaxation=True)
    assert "not supported" in c.record.steps["linear_relaxation_not_applicable"]


def test_auto_is_resolved_before_certifying_and_recorded_as_what_ran():
    """certify-model resolves auto to on, the pipeline to off; an explicit choice is kept."""
    from omegaconf import OmegaConf

    from locallip.certify.settings import from_config
    from locallip.foundation.compose import with_linear_relaxation
    from locallip.foundation.schema import CertifySettings

    typed = CertifySettings()
    assert str(typed.linear_relaxation) == "auto"
    assert str(with_linear_relaxation(typed, auto_on=True).linear_relaxation) == "on"
    assert str(with_linear_relaxation(typed, auto_on=False).linear_relaxation) == "off"
    assert from_config(with_linear_relaxation(typed, auto_on=True)).linear_relaxation is True
    assert from_config(with_linear_relaxation(typed, auto_on=False)).linear_relaxation is False
    untyped = OmegaConf.structured(CertifySettings(linear_relaxation="off"))
    assert str(with_linear_relaxation(untyped, auto_on=True).linear_relaxation) == "off"
    chosen = OmegaConf.structured(CertifySettings())
    assert str(with_linear_relaxation(chosen, auto_on=True).linear_relaxation) == "on"
    assert str(chosen.linear_relaxation) == "auto"  # the caller's configuration is not changed


def test_certify_model_runs_the_step_by_default_except_on_clipped_networks():
    from locallip.certify.relaxation_step import pays_by_default
    from locallip.nn.activations import make_activation

    plain = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    assert pays_by_default(plain)
    assert pays_by_default(nn.Sequential(nn.Linear(4, 6), make_activation("maxmin", (6,)), nn.Linear(6, 3)))
    for name in ("clipped_relu", "clipped_maxmin"):
        assert not pays_by_default(nn.Sequential(nn.Linear(4, 6), make_activation(name, (6,)), nn.Linear(6, 3)))
