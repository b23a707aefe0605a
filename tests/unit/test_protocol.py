"""The layer protocol and the step registry are open: a new layer type, or a new cascade step,
is written once and registered once, and everything else picks it up.

* ``ScaledIdentity`` (y = s * h), defined here with its bound object and one ``register_layer``
  call, is accepted by ``network_layers``, ``global_bound``, ``local_bound`` at every level,
  ``certify`` and ``certified_radius``; its norms pass the same explicit-matrix oracles as the
  built-in layers, and every certificate survives PGD.
* An ``unscreened`` step (masked norms proven exactly, without the screen), defined here with one
  ``register_step`` call, runs in the cascade, and shows up in the certificates, the split's
  summary and CSV rows, the report's steps table and the guarantee sentence.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from locallip.attack import pgd_l2
from locallip.bounds import (AffineLayer, LayerType, global_bound, local_bound, network_layers, register_layer,
                             worst_margin)
from locallip.bounds.layers.registry import _REGISTRY
from locallip.certify import STEP, Step, certified_radius, certify, register_step
from locallip.certify.steps import unregister_step
from locallip.nn.activations import ReLU

DT = torch.float64
pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")


# --------------------------------------------------------------------------- a new layer type


class ScaledIdentity(nn.Module):
    """y = s * h, with a learnable scalar s."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, h):
        return h * self.scale


class ScaledIdentityLayer(AffineLayer):
    """The bound object: W = s I, so every product is a scaling and ||W|| = |s|."""

    def __init__(self, module: ScaledIdentity, in_shape, norm=None, flatten=False, scale=None):
        if norm is not None or flatten:
            raise ValueError("ScaledIdentity takes no folded Normalize or Flatten")
        self.owner = module
        self.in_shape = self.out_shape = tuple(in_shape)
        self.s = module.scale if scale is None else scale

    @property
    def dtype(self):
        return self.s.dtype

    def forward(self, h):
        return h * self.s

    def linear(self, v):
        return v * self.s

    def transpose(self, u):
        return u * self.s

    def abs_linear(self, v):
        return v * self.s.abs()

    def row_norms(self, col_mask=None):
        ones = torch.ones((1,) + self.in_shape, dtype=self.s.dtype)
        return (ones if col_mask is None else col_mask) * self.s.abs()

    def cast(self, dtype):
        return ScaledIdentityLayer(self.owner, self.in_shape, scale=self.s.detach().to(dtype))

    def guaranteed_norm(self):
        return self.s.detach().double().abs()


@pytest.fixture
def scaled_identity():
    register_layer(LayerType("scaled_identity", ScaledIdentity, "affine", ScaledIdentityLayer))
    yield
    del _REGISTRY[ScaledIdentity]


def _net(seed: int, scale: float = 0.8) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 10), ReLU(), ScaledIdentity(scale), ReLU(), nn.Linear(10, 3))
    net.input_shape = (6,)
    return net.to(DT).eval()


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 6, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_an_unregistered_layer_is_refused_with_its_name():
    with pytest.raises(ValueError, match="ScaledIdentity"):
        network_layers(_net(0))


def test_a_registered_layer_gets_its_global_norm_from_its_own_bound_object(scaled_identity):
    net = _net(0, scale=-0.8)
    ops, _ = network_layers(net)
    assert isinstance(ops[1], ScaledIdentityLayer)
    g = global_bound(net)
    explicit = torch.linalg.matrix_norm(ops[1].explicit_matrix(), ord=2)  # the protocol's default: from linear
    assert torch.allclose(explicit, torch.tensor(0.8, dtype=DT))
    assert g.layer_norms[1] >= explicit and g.layer_norms[1] <= explicit * (1 + 1e-8)


@pytest.mark.parametrize("level", ["probabilistic", "exact", "estimate"])
def test_local_bound_of_a_registered_layer_between_the_oracle_and_the_global_norm(scaled_identity, level):
    net, x = _net(1), _x(16, 1)
    ops, _ = network_layers(net)
    g = global_bound(net)
    lb = local_bound(net, x, 0.3, level=level, generator=torch.Generator().manual_seed(0), tol=1e-10,
                     work_dtype=None)
    for l, (op, (col, row)) in enumerate(zip(ops[:-1], lb.operator_masks())):
        m = op.explicit_matrix()
        c = torch.ones(x.shape[0], m.shape[1], dtype=DT) if col is None else col.flatten(1).expand(x.shape[0], -1)
        exact = torch.linalg.svdvals(row.flatten(1)[:, :, None] * m[None] * c[:, None, :])[:, 0]
        assert (lb.layer_norms[:, l] <= g.layer_norms[l] * (1 + 1e-12)).all()
        if level == "estimate":
            assert torch.allclose(lb.layer_norms[:, l], exact, rtol=1e-6)
        else:  # sound levels: never below the true masked norm
            assert (lb.layer_norms[:, l] >= exact * (1 - 1e-12)).all()


def test_certificates_through_a_registered_layer_survive_pgd(scaled_identity):
    net, x = _net(2, scale=1.3), _x(48, 2)
    y = net(x).argmax(1)
    for eps in (0.05, 0.15):
        glob = certify(net, x, y, eps, "global")
        c = certify(net, x, y, eps, generator=torch.Generator().manual_seed(0))
        assert not (glob.certified & ~c.certified).any()
        idx = c.certified.nonzero().squeeze(1)
        assert idx.numel() > 0
        am = pgd_l2(net, x[idx], y[idx], eps, steps=50, restarts=3, generator=torch.Generator().manual_seed(1))
        assert (am > 0).all()
    r = certified_radius(net, x, y, max_radius=1.0, generator=torch.Generator().manual_seed(0))
    assert (r > 0).any()


# --------------------------------------------------------------------------- a new cascade step


def run_unscreened(state, settings):
    """Masked layer norms proven exactly for every open point, without the screen (sound: the exact level)."""
    from locallip.bounds import local_margins

    idx = state.open()
    state.record.steps["unscreened"] = int(idx.numel())
    if not idx.numel():
        return
    lb = local_bound(state.model, state.x[idx], state.eps[idx], level="exact", global_norms=state.g.layer_norms,
                     generator=state.generator, clean=state.clean.select(idx))
    margins = local_margins(state.model, lb, state.pred[idx], settings.last_layer)
    state.apply(idx, margins, torch.full_like(idx, STEP["unscreened"]))


@pytest.fixture
def unscreened_step():
    register_step(Step("unscreened", True, "deterministic", "unscreened exact norms",
                       "masked layer norms proven exactly without a screen", run=run_unscreened), before="exact")
    yield
    unregister_step("unscreened")


def _plain_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 12), ReLU(), nn.Linear(12, 3))
    net.input_shape = (6,)
    return net.to(DT).eval()


def test_a_registered_step_runs_in_the_cascade_and_is_reported(unscreened_step):
    from locallip.certify.split import certify_split
    from locallip.foundation.compose import from_plain
    from locallip.foundation.schema import CertifySettings
    from locallip.stages.report.tables import steps_csv, steps_table

    net, x = _plain_net(3), _x(64, 3)
    y = net(x).argmax(1)
    eps = 0.05
    c = certify(net, x, y, eps, generator=torch.Generator().manual_seed(0))
    counts = c.step_counts()
    assert counts["unscreened"] > 0, counts  # it runs before the masked step, which then finds nothing
    assert counts["exact"] == 0
    assert c.deterministic[c.step == STEP["unscreened"]].all()
    assert "without a screen" in c.promise
    idx = (c.step == STEP["unscreened"]).nonzero().squeeze(1)
    assert (pgd_l2(net, x[idx], y[idx], eps, generator=torch.Generator().manual_seed(1)) > 0).all()
    cfg = from_plain(CertifySettings, {"batch_size": 32, "attack": {"steps": 10, "restarts": 1}}, "certify")
    result = certify_split(net, x.float().double(), y, eps, cfg, progress=False)
    s = result["summary"]
    assert s["steps"]["certified_by_step"]["unscreened"] == counts["unscreened"]
    assert s["steps"]["deterministic"] == s["steps"]["certified"]
    assert any(r["step_local"] == "unscreened" and r["guarantee_local"] == "exact" for r in result["rows"])
    header, rows = steps_table([s])
    assert "by unscreened exact norms" in header
    assert "unscreened" in steps_csv([s]).splitlines()[0]


def test_an_unregistered_step_leaves_the_cascade_as_it_was():
    net, x = _plain_net(3), _x(64, 3)
    y = net(x).argmax(1)
    c = certify(net, x, y, 0.05, generator=torch.Generator().manual_seed(0))
    assert "unscreened" not in c.step_counts()
    assert math.isclose(sum(c.step_counts().values()), int(c.certified.sum()))


# --------------------------------------------------------------------------- a global bound belongs to its weights


def test_a_global_bound_is_refused_for_another_model_or_later_weights():
    """certify(mB, ..., global_result=global_bound(mA)) with mB = mA with its first layer x 10 once
    certified points that PGD broke (issue: reliability round 2, defect 4). Now it is refused, and so
    is a bound whose model's weights changed since."""
    a = _plain_net(5)
    b = _plain_net(5)
    with torch.no_grad():
        b[1].weight.mul_(10)
    x = _x(64, 5)
    y = b(x).argmax(1)
    g_a = global_bound(a)
    with pytest.raises(ValueError, match="other weights"):
        certify(b, x, y, 0.05, global_result=g_a)
    with pytest.raises(ValueError, match="other weights"):
        certified_radius(b, x, y, max_radius=1.0, global_result=g_a)
    certify(a, x, y, 0.05, global_result=g_a)  # its own model: accepted
    with torch.no_grad():
        a[1].weight.add_(1e-3)  # an optimizer step, in place
    with pytest.raises(ValueError, match="other weights"):
        certify(a, x, y, 0.05, global_result=g_a)


def test_a_wrapped_model_or_a_non_finite_weight_is_one_clear_error():
    net, x = _plain_net(6), _x(8, 6)
    y = net(x).argmax(1)
    with pytest.raises(ValueError, match="model.module"):
        certify(nn.DataParallel(net), x, y, 0.1)
    with torch.no_grad():
        net[1].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="1.weight holds NaN or inf"):
        certify(net, x, y, 0.1)
    with pytest.raises(ValueError, match="1.weight holds NaN or inf"):
        certified_radius(net, x, y, max_radius=1.0)
