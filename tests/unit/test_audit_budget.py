"""The attack audit's time budget (``certify.attack.budget``).

None (the default) must audit exactly as before: every point robust at any level, with the same
generator use, so the same attack margins and counts (the reference below is the old audit
written out: certify the batch, then attack every robust point with the batch's generator). A
budget attacks a seeded random subset of each batch's robust points, each fully, and keeps the
audit's seconds within budget x the certification's, plus the one-point probe that gives the
first estimate.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from locallip.attack import audit_l2
from locallip.bounds import global_bound
from locallip.certify import certify
from locallip.certify import split
from locallip.certify.split import batches, certify_split, level_settings
from locallip.foundation.audit_words import audit_share
from locallip.foundation.compose import from_plain
from locallip.foundation.schema import CertifySettings
from test_audit_attack import EPS, SHRINK, _clusters, _trained_cnn

pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")

N = 48
SOUND_EPS = 0.2  # the sound bound certifies 33 of these 48 points here (at EPS, none)
CONFIG = Path(__file__).resolve().parents[2] / "config"


def _cfg(batch_size: int, **attack) -> CertifySettings:
    return from_plain(CertifySettings, {"batch_size": batch_size, "attack": {"steps": 20, "restarts": 2, **attack}},
                      "certify")


def _old_audit(net, x, y, eps, cfg, g):
    """The audit before the budget, one batch: every point robust at any level attacked with the batch's
    generator after the local certificate drew from it. (attack margins with NaN where not attacked, broken)"""
    (start, gen), = batches(x.shape[0], cfg.batch_size, cfg.seed)
    glo = certify(net, x, y, eps, "global", global_result=g)
    loc = certify(net, x, y, eps, "local", level_settings(cfg, str(cfg.guarantee)), generator=gen, global_result=g)
    idx = (glo.robust | loc.robust).nonzero().squeeze(1)
    margins = torch.full((x.shape[0],), float("nan"), dtype=x.dtype)
    with torch.enable_grad():
        margins[idx] = audit_l2(net, x[idx], glo.prediction[idx], eps, cfg.attack, generator=gen,
                                work_dtype=torch.float32)
    return margins, int((margins[idx] <= 0).sum())


def _margins(rows):
    return torch.tensor([math.nan if r["attack_margin"] is None else r["attack_margin"] for r in rows],
                        dtype=torch.float64)


@pytest.mark.parametrize("shrink, eps", [(1.0, SOUND_EPS), (SHRINK, EPS)])
def test_no_budget_audits_every_robust_point_as_before(shrink, eps, monkeypatch):
    """Sound bound (shrink 1) and the planted unsound one (the guaranteed bound / 5): the same margins
    and the same broken count as the old audit; with the planted bound it breaks false certificates."""
    net = _trained_cnn()
    x, y = _clusters(N, 1)
    x = x.double()
    g = global_bound(net, method="guaranteed", input_shape=(1, 8, 8))
    g = dataclasses.replace(g, lipschitz=g.lipschitz / shrink, cache={}, vectors=None) if shrink != 1 else g
    cfg = _cfg(N)
    assert cfg.attack.budget is None
    expected, broken = _old_audit(net, x, y, eps, cfg, g)
    monkeypatch.setattr(split, "global_bound", lambda *a, **k: g)
    result = certify_split(net, x, y, eps, cfg, progress=False)
    a = result["summary"]["attack"]
    assert torch.equal(_margins(result["rows"]).isnan(), expected.isnan())
    assert torch.equal(_margins(result["rows"]).nan_to_num(7.0), expected.nan_to_num(7.0))
    assert a["broken"] == broken and a["checked"] == a["robust_points"] == int((~expected.isnan()).sum())
    assert a["budget"] is None and a["unaudited"] == 0 and audit_share(a) == "" and a["checked"] > 10
    if shrink != 1:
        assert broken > 0, "the planted certificate should be caught"
    else:
        assert broken == 0


def test_a_tiny_budget_audits_a_subset_each_point_fully_within_its_time():
    net = _trained_cnn()
    x, y = _clusters(N, 1)
    x = x.double()
    budget = 0.05
    result = certify_split(net, x, y, SOUND_EPS, _cfg(8, budget=budget), progress=False)
    s = result["summary"]
    a, t = s["attack"], s["timing"]
    attacked = [r for r in result["rows"] if r["attack_margin"] is not None]
    assert a["budget"] == budget and a["performed"]
    assert 1 <= a["checked"] == len(attacked) < a["robust_points"]
    assert a["unaudited"] == a["robust_points"] - a["checked"] > 0
    assert all(math.isfinite(r["attack_margin"]) for r in attacked)
    assert t["audit_s"] <= budget * t["certification_s"] + t["audit_probe_s"]
    assert audit_share(a) == (f"audited {a['checked']} of {a['robust_points']} certified points "
                              f"(budget 0.05 x certification time)")


def test_a_budget_that_covers_everything_audits_every_robust_point():
    """Seeded order, full attack: a budget far above the attack's cost leaves no robust point out."""
    net = _trained_cnn()
    x, y = _clusters(16, 2)
    result = certify_split(net, x.double(), y, SOUND_EPS, _cfg(8, budget=1e6), progress=False)
    a = result["summary"]["attack"]
    assert a["checked"] == a["robust_points"] > 0 and a["unaudited"] == 0


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_a_zero_or_negative_budget_is_refused_naming_the_field(value):
    from locallip.foundation.compose import compose
    from locallip.foundation.schema import ConfigError

    with pytest.raises(ConfigError) as e:
        compose("smoke", [f"certify.attack.budget={value}"], config_dir=CONFIG)
    assert "certify.attack.budget" in str(e.value) and "\n" not in str(e.value)
    assert compose("smoke", ["certify.attack.budget=0.5"], config_dir=CONFIG).certify.attack.budget == 0.5
