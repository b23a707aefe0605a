"""The three guarantee levels of the local bound: probabilistic, exact, estimate.

* the Kuczynski-Wozniakowski inflation and the step count chosen from it;
* adversarial spectra (clustered top singular values, tiny gaps, rank-deficient masks)
  where few-step Lanczos under-estimates: the probabilistic bound covers the exact norm
  in every trial, and the raw Ritz value misses it more often than delta allows only
  without the inflation;
* ``exact`` >= the explicit masked matrix's SVD and <= the guaranteed global norm, never below,
  and its budget fallback;
* certificates at every level survive PGD.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from locallip.bounds import AffineOp, global_bound, local_bound, network_layers
from locallip.bounds.exact import exact_masked_norms
from locallip.bounds.krylov import (fp_margin, lanczos_inflation, lanczos_norm,
                                    steps_for_inflation)
from locallip.nn.activations import make_activation
from test_bounds import _mixed_model, _randomize_thresholds, _row_masks, exact_masked_norm, explicit_matrix

DT = torch.float64
pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")


# --------------------------------------------------------------------------- the inflation formula


def test_inflation_formula_values():
    # e = (ln(1.648 sqrt(n) / delta) / (2k - 1))^2, by hand for n = 100, k = 50, delta = 1e-9.
    expected = (math.log(1.648 * 10 / 1e-9) / 99) ** 2
    assert lanczos_inflation(100, 50, 1e-9) == pytest.approx(expected, rel=1e-12)
    assert lanczos_inflation(100, 100, 1e-9) == 0.0  # the whole space: exact
    assert lanczos_inflation(100, 150, 1e-9) == 0.0
    assert lanczos_inflation(10_000, 3, 1e-9) == 1.0  # too few steps: no usable bound
    # More steps, larger delta or smaller n all shrink e.
    assert lanczos_inflation(1000, 60, 1e-9) < lanczos_inflation(1000, 40, 1e-9)
    assert lanczos_inflation(1000, 40, 1e-3) < lanczos_inflation(1000, 40, 1e-9)
    assert lanczos_inflation(500, 40, 1e-9) < lanczos_inflation(5000, 40, 1e-9)
    for bad in (0.0, 1.0, -1e-3):
        with pytest.raises(ValueError):
            lanczos_inflation(100, 10, bad)


@pytest.mark.parametrize("n,delta,target", [(784, 1e-9 / 3, 0.01), (3136, 1e-9, 0.01), (100, 1e-6, 0.02),
                                            (20_000, 1e-12, 0.005)])
def test_steps_for_inflation_is_the_smallest_sufficient(n, delta, target):
    k = steps_for_inflation(n, delta, target)

    def inflation(steps):
        return 1 / math.sqrt(1 - lanczos_inflation(n, steps, delta)) - 1

    assert inflation(k) <= target + 1e-12
    if k > 1 and k < n:
        assert inflation(k - 1) > target


def test_fp_margin_scales_with_unit_roundoff():
    assert fp_margin(1000, 90, torch.float64) < 1e-10
    assert 1e-4 < fp_margin(1000, 90, torch.float32) < 1e-2


# --------------------------------------------------------------------------- adversarial spectra


def _dense_op(singular: torch.Tensor, n_in: int, seed: int) -> AffineOp:
    """A Linear layer with the given singular values (random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    m = singular.numel()
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=DT))
    v, _ = torch.linalg.qr(torch.randn(n_in, m, generator=g, dtype=DT))
    layer = nn.Linear(n_in, m, bias=False).to(DT)
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(singular) @ v.T)
    return AffineOp(layer, (n_in,))


def _spectra(m: int) -> dict:
    i = torch.arange(m, dtype=DT)
    return {
        # many singular values within 1e-4 of the top one: Lanczos cannot separate them
        "clustered_top": torch.cat([1 - 1e-4 * torch.rand(m // 4, generator=torch.Generator().manual_seed(1),
                                                          dtype=DT), 0.5 * torch.rand(m - m // 4, dtype=DT)]),
        # a tiny gap between the top two, the rest spread below
        "tiny_gap": torch.cat([torch.tensor([1.0, 1 - 1e-6], dtype=DT), 0.999 - 0.6 * i[2:] / m]),
        # slowly decaying: the worst case for few steps
        "slow_decay": 1 - 0.3 * (i / m) ** 0.5,
    }


def _masks(n_in: int, m: int, batch: int, rank_deficient: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    col = (torch.rand(batch, n_in, generator=g) < 0.8).to(DT)
    row = (torch.rand(batch, m, generator=g) < 0.8).to(DT)
    if rank_deficient:
        row[:, 3:] = 0  # at most 3 active rows: A has rank <= 3
        row[:, :3] = 1
    return col, row


def _probabilistic_bound(op, col, row, steps, delta, side, seed):
    shape = op.in_shape if side == "input" else op.out_shape
    start = torch.randn((col.shape[0],) + tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=DT)
    res = lanczos_norm(op, col, row, start, steps=steps, side=side, work_dtype=torch.float32)
    e = torch.tensor([lanczos_inflation(int(n), int(t), delta) for n, t in zip(res.dims, res.steps)], dtype=DT)
    margin = torch.tensor([fp_margin(int(n), int(t), torch.float32) for n, t in zip(res.dims, res.steps)], dtype=DT)
    bound = res.sigma.detach() * (1 + margin) / torch.sqrt(1 - e.clamp(max=1 - 1e-300))
    return res.sigma.detach(), bound, e


@pytest.mark.parametrize("spectrum", ["clustered_top", "tiny_gap", "slow_decay"])
@pytest.mark.parametrize("rank_deficient", [False, True])
@pytest.mark.parametrize("side", ["input", "output"])
def test_probabilistic_bound_covers_adversarial_spectra(spectrum, rank_deficient, side):
    m, n_in, batch, delta = 120, 160, 8, 1e-9
    op = _dense_op(_spectra(m)[spectrum], n_in, seed=3)
    col, row = _masks(n_in, m, batch, rank_deficient, seed=4)
    exact = exact_masked_norm(op.weight.detach(), row, col)
    n_side = n_in if side == "input" else m
    k = steps_for_inflation(n_side, delta, 0.01)
    few = 8
    under = 0
    for trial in range(25):
        sigma, bound, e = _probabilistic_bound(op, col, row, k, delta, side, seed=100 + trial)
        assert torch.all(bound >= exact), (trial, (bound / exact).min())
        assert torch.all(sigma <= exact * (1 + 1e-6))  # the raw value is from below
        raw_few, _, _ = _probabilistic_bound(op, col, row, few, delta, side, seed=100 + trial)
        under += int((raw_few < exact * (1 - 1e-4)).sum())
    if not rank_deficient:  # a rank-3 operator is found exactly in 4 steps
        assert under > 0  # few-step Lanczos really under-estimates here: the case is not vacuous


def test_failure_rate_of_the_inflated_ritz_value_is_below_delta():
    """At a large delta the theorem's promise is testable: the fraction of random starts whose inflated
    value misses the norm is at most delta (it is far smaller in practice)."""
    m, n_in, steps, delta = 200, 200, 6, 0.2
    op = _dense_op(_spectra(m)["slow_decay"], n_in, seed=5)
    ones_c, ones_r = torch.ones(1, n_in, dtype=DT), torch.ones(1, m, dtype=DT)
    exact = float(torch.linalg.svdvals(op.weight.detach())[0])
    trials, misses, raw_misses = 400, 0, 0
    col, row = ones_c.expand(trials, -1), ones_r.expand(trials, -1)
    sigma, bound, e = _probabilistic_bound(op, col, row, steps, delta, "input", seed=11)
    assert float(e.max()) < 1
    misses = int((bound < exact).sum())
    raw_misses = int((sigma < exact * (1 - 1e-3)).sum())
    assert misses <= delta * trials
    assert raw_misses > delta * trials  # without the inflation, 6 steps miss far more often


# --------------------------------------------------------------------------- local_bound at each level


@pytest.mark.parametrize("act", ["relu", "clipped_relu", "clipped_maxmin"])
@pytest.mark.parametrize("normalize", [False, True])
def test_exact_between_explicit_svd_and_global(act, normalize):
    model = _mixed_model(normalize, act)
    _randomize_thresholds(model, torch.Generator().manual_seed(0))
    x = torch.rand(4, 2, 7, 7, generator=torch.Generator().manual_seed(0), dtype=DT)
    g = global_bound(model)
    for eps in (0.05, 0.3):
        lb = local_bound(model, x, eps, guarantee="exact", generator=torch.Generator().manual_seed(1))
        ops, _ = network_layers(model)
        rows = _row_masks(model, lb)
        cols = [torch.ones((4,) + tuple(ops[0].in_shape), dtype=DT)] + lb.masks[:-1]
        for l, op in enumerate(ops[:-1]):
            svd = exact_masked_norm(explicit_matrix(op), rows[l], cols[l])
            got = lb.layer_norms[:, l]
            assert torch.all(got >= svd), (l, got, svd)  # never below
            assert torch.all(got <= g.layer_norms[l])  # never above the global norm
            assert torch.all(got <= svd * (1 + 1e-3) + 1e-12), (l, got / svd)  # and tight
        assert all(layer["global_fallback"] == 0 for layer in lb.info["layers"])


def test_exact_budget_falls_back_to_the_global_norm():
    model = _mixed_model(False, "relu")
    x = torch.rand(3, 2, 7, 7, generator=torch.Generator().manual_seed(0), dtype=DT)
    g = global_bound(model)
    lb = local_bound(model, x, 0.1, guarantee="exact", exact_max_entries=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(lb.layer_norms, g.layer_norms.expand(3, -1))
    assert all(layer["proven"] == 0 for layer in lb.info["layers"])


def test_exact_proof_fails_below_the_norm():
    """Trial values below ||A||^2 are never proven: the bound is the global fallback, not the trial."""
    op = _dense_op(torch.linspace(1.0, 0.1, 30, dtype=DT), 40, seed=2)
    row = torch.ones(2, 30, dtype=DT)
    exact = float(torch.linalg.svdvals(op.weight.detach())[0])
    low = torch.full((2,), exact * 0.9, dtype=DT)  # a wrong, too-small "estimate"
    bound, proven = exact_masked_norms(op, None, row, low, "output")
    # Every trial factor up to 1.1 squared stays below 1/0.81: nothing is proven.
    assert not proven.any() and torch.isnan(bound).all()
    good = torch.full((2,), exact, dtype=DT)
    bound, proven = exact_masked_norms(op, None, row, good, "output")
    assert proven.all() and torch.all(bound >= exact) and torch.all(bound <= exact * (1 + 1e-5))


@pytest.mark.parametrize("level", ["probabilistic", "exact", "estimate"])
def test_levels_are_ordered_and_labelled(level):
    model = _mixed_model(False, "clipped_relu")
    _randomize_thresholds(model, torch.Generator().manual_seed(0))
    x = torch.rand(5, 2, 7, 7, generator=torch.Generator().manual_seed(2), dtype=DT)
    lb = local_bound(model, x, 0.2, guarantee=level, generator=torch.Generator().manual_seed(3))
    est = local_bound(model, x, 0.2, guarantee="estimate", tol=1e-10, work_dtype=None,
                      generator=torch.Generator().manual_seed(3))
    g = global_bound(model)
    assert torch.all(lb.lipschitz <= g.lipschitz * (1 + 1e-12))
    if level != "estimate":
        assert lb.guarantee == level and lb.info["level"] == level
        assert torch.all(lb.lipschitz >= est.lipschitz * (1 - 1e-9))  # sound levels sit above the estimate
    else:
        assert lb.guarantee.startswith("estimate")
    if level == "probabilistic":
        assert lb.info["delta"] == 1e-9 and len(lb.info["layers"]) == 4
        for layer in lb.info["layers"]:
            assert layer["steps"] >= 1 and layer["inflation_max"] <= 0.02


def test_sound_levels_need_a_random_start():
    model = _mixed_model(False, "relu")
    x = torch.rand(2, 2, 7, 7, dtype=DT)
    with pytest.raises(ValueError, match="random"):
        local_bound(model, x, 0.1, guarantee="probabilistic", init="global")
    with pytest.raises(ValueError, match="guarantee"):
        local_bound(model, x, 0.1, guarantee="likely")


def test_plain_sequential_and_no_hidden_layer():
    """Any plain Sequential (no input_shape attribute) works; with no hidden layer the input is the feature."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), make_activation("relu", (3, 5, 5)), nn.Flatten(),
                        nn.Linear(75, 4)).to(DT)
    x = torch.rand(3, 1, 5, 5, dtype=DT)
    lb = local_bound(net, x, 0.1, generator=torch.Generator().manual_seed(0))
    g = global_bound(net, input_shape=(1, 5, 5))
    assert torch.all(lb.lipschitz <= g.lipschitz)
    with pytest.raises(ValueError, match="input_shape"):
        global_bound(net)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(25, 4)).to(DT)
    lb = local_bound(linear, x, 0.1)
    assert lb.layer_norms.shape == (3, 0) and torch.all(lb.lipschitz == 1)
    assert torch.allclose(lb.radius, torch.full((3,), 0.1, dtype=DT))
    assert global_bound(linear).lipschitz == 1
