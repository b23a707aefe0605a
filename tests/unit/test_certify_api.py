"""The public ``certify`` API: local ⊇ global, certificates survive PGD, and the edge cases.

Edge cases: all-equal logits, exact ties, misclassified points, tiny weights
(1e-5 scale), batch of 1, a mixed batch vs certifying each point alone, eps = 0.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

from locallip.nn.activations import make_activation
from locallip.attack import margin_attack_l2, pgd_l2
from locallip.bounds import AffineOp, global_bound, local_bound, network_layers
from locallip.certify import certify
from net_helpers import fit_briefly
from locallip.nn.models import LipschitzNet

DT = torch.float64
ACTS = ["relu", "clipped_relu", "maxmin", "clipped_maxmin"]


pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")


def _data(n: int, seed: int, noise: float = 0.15):
    """Three noisy clusters in [0, 1]^(1x4x4) (fixed centres)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(100))
    y = torch.randint(0, 3, (n,), generator=g)
    return centers[y] + noise * torch.randn(n, 1, 4, 4, generator=g), y


def _dense(act: str) -> LipschitzNet:
    return LipschitzNet(nn.Flatten(), nn.Linear(16, 16), make_activation(act, (16,)), nn.Linear(16, 12),
                        make_activation(act, (12,)), nn.Linear(12, 3), input_shape=(1, 4, 4), num_classes=3)


def _conv(act: str) -> LipschitzNet:
    return LipschitzNet(nn.Conv2d(1, 4, 3, stride=1, padding=1), make_activation(act, (4, 4, 4)),
                        nn.Conv2d(4, 8, 3, stride=2, padding=1), make_activation(act, (8, 2, 2)), nn.Flatten(),
                        nn.Linear(32, 10), make_activation(act, (10,)), nn.Linear(10, 3),
                        input_shape=(1, 4, 4), num_classes=3)


@functools.lru_cache(maxsize=None)
def _trained(kind: str, act: str) -> LipschitzNet:
    """A tiny net after 60 Adam steps of cross-entropy on the clusters (float64, eval mode)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _dense(act) if kind == "dense" else _conv(act)
    x, y = _data(128, 0)
    fit_briefly(model, x, y, steps=60, lr=1e-2)
    return model.to(DT).eval()


def trained(kind: str, act: str) -> LipschitzNet:
    return copy.deepcopy(_trained(kind, act))


def _points(n: int = 16, seed: int = 1):
    x, y = _data(n, seed)
    return x.to(DT), y




def _cert(model, x, y, eps, bound="local", **kw):
    """certify with a seeded random start (local) or the guaranteed global bound (local-only options dropped)."""
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    if bound == "global":
        kw = {k: v for k, v in kw.items() if k not in ("generator", "tol", "max_iter", "last_layer", "work_dtype",
                                                      "guarantee")}
    return certify(model, x, y, eps, bound, **kw)


EPS = {"dense": (0.3, 0.6), "conv": (0.15, 0.3)}
MODELS = [(k, a) for k in ("dense", "conv") for a in ACTS]


# --------------------------------------------------------------------------- 7. local ⊇ global, PGD audit


@pytest.mark.parametrize("kind,act", MODELS)
def test_local_certifies_superset_of_global(kind, act):
    model = trained(kind, act)
    x, y = _points()
    for eps in (0.0,) + EPS[kind]:
        loc, glo = _cert(model, x, y, eps, "local"), _cert(model, x, y, eps, "global")
        assert loc.kind == "local" and glo.kind == "global"
        assert torch.equal(loc.prediction, glo.prediction)
        assert not torch.any(glo.certified & ~loc.certified), eps
        assert torch.all(loc.worst_margin >= glo.worst_margin)
        # certify iterates in float32: the local norms can exceed the true ones by ~1e-7 (see
        # test_bounds.py::test_float32_work_dtype_sigma_is_from_below), more than the global bound's slack.
        assert torch.all(loc.bound <= glo.bound * (1 + 1e-6))
        assert loc.converged.all()


def test_local_strictly_better_somewhere():
    """On the clipped-ReLU conv net the local bound certifies points the global one cannot."""
    model = trained("conv", "clipped_relu")
    x, y = _points()
    loc, glo = _cert(model, x, y, 0.15, "local"), _cert(model, x, y, 0.15, "global")
    assert int(loc.certified.sum()) > int(glo.certified.sum())


@pytest.mark.parametrize("kind,act", MODELS)
def test_certified_points_survive_pgd(kind, act):
    model = trained(kind, act)
    x, y = _points()
    gen = torch.Generator().manual_seed(7)
    n_certified = 0
    for eps in EPS[kind]:
        for bound, level in (("local", "probabilistic"), ("local", "exact"), ("local", "estimate"), ("global", None)):
            cert = _cert(model, x, y, eps, bound, **({} if level is None else {"guarantee": level}))
            # The worst-margin lower bound holds at every point PGD finds (certified or not) ...
            attacked = pgd_l2(model, x, cert.prediction, eps, steps=50, restarts=5, step_size=0.1, generator=gen)
            assert torch.all(cert.worst_margin <= attacked + 1e-10), (bound, eps, (cert.worst_margin - attacked).max())
            # ... so no certified point is broken.
            assert torch.all(attacked[cert.certified] > 0), (bound, level, eps)
            if bound == "local":
                n_certified += int(cert.certified.sum())
    assert n_certified > 0  # not vacuous


@pytest.mark.parametrize("attack", [pgd_l2, margin_attack_l2], ids=["pgd", "margin"])
def test_pgd_finds_counterexamples_on_uncertified_points(attack):
    """Sanity of the audit itself: at a large radius the attack (the older PGD, and the margin attack
    the audit runs now) does break predictions."""
    model = trained("dense", "relu")
    x, y = _points()
    attacked = attack(model, x, y, 1.5, steps=50, restarts=5, generator=torch.Generator().manual_seed(0))
    assert torch.any(attacked <= 0)
    assert not _cert(model, x, y, 1.5).certified[attacked <= 0].any()


def test_a_float32_search_reports_the_float64_models_margin():
    """The audit searches in float32 and re-evaluates what it found in the model's float64: the
    margin it returns is one the float64 model takes inside the ball (never below the certified
    worst case), and it breaks about as many predictions as the float64 search."""
    model = trained("dense", "relu")
    x, y = _points()
    for eps in (0.5, 1.5):
        fast = pgd_l2(model, x, y, eps, generator=torch.Generator().manual_seed(0), work_dtype=torch.float32)
        slow = pgd_l2(model, x, y, eps, generator=torch.Generator().manual_seed(0))
        assert fast.dtype == torch.float64 and next(model.parameters()).dtype == torch.float64
        with torch.no_grad():
            z = model(x)
        clean = z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], float("-inf")).max(1).values
        assert torch.all(fast <= clean)
        assert torch.all(_cert(model, x, y, eps).worst_margin <= fast + 1e-10)
        assert abs(int((fast <= 0).sum()) - int((slow <= 0).sum())) <= max(1, int((slow <= 0).sum()) // 10)
    assert torch.any(fast <= 0)


# --------------------------------------------------------------------------- 4. edge cases


def _with_last_layer(model, weight, bias):
    model = copy.deepcopy(model)
    with torch.no_grad():
        model[-1].weight.copy_(weight)
        model[-1].bias.copy_(bias)
    return model


@pytest.mark.parametrize("bound", ["local", "global"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_all_equal_logits_are_not_certified(bound, eps):
    model = trained("conv", "clipped_relu")
    x, y = _points(8)
    w = model[-1].weight
    zero = _with_last_layer(model, torch.zeros_like(w), torch.zeros(3, dtype=DT))
    same = _with_last_layer(model, w[:1].expand_as(w).clone(), torch.full((3,), 0.7, dtype=DT))
    for m in (zero, same):
        with torch.no_grad():
            z = m(x)
        assert torch.all(z == z[:, :1])
        c = _cert(m, x, y, eps, bound)
        assert not c.certified.any() and not c.robust.any()
        assert torch.all(c.worst_margin <= 0)


@pytest.mark.parametrize("bound", ["local", "global"])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_exact_tie_is_not_certified(bound, eps):
    """Classes 0 and 1 have identical rows (an exact tie at every input), class 2 is far below."""
    model = trained("dense", "relu")
    x, _ = _points(6)
    w = model[-1].weight.clone()
    w[1] = w[0]
    w[2] = w[0]
    tied = _with_last_layer(model, w, torch.tensor([5.0, 5.0, -5.0], dtype=DT))
    with torch.no_grad():
        z = tied(x)
    assert torch.all(z[:, 0] == z[:, 1]) and torch.all(z[:, 2] < z[:, 0])
    y = torch.zeros(6, dtype=torch.long)
    c = _cert(tied, x, y, eps, bound)
    assert torch.all(c.prediction == 0) and c.correct.all()
    assert torch.all(c.worst_margin <= 0)
    assert not c.certified.any()


def test_eps_zero_certifies_exactly_the_correct_points_with_a_positive_margin():
    model = trained("conv", "maxmin")
    x, y = _points()
    y = y.clone()
    y[:4] = (y[:4] + 1) % 3  # some wrong labels
    with torch.no_grad():
        z = model(x)
    top2 = z.topk(2, dim=1).values
    for bound in ("local", "global"):
        c = _cert(model, x, y, 0.0, bound)
        assert torch.allclose(c.worst_margin, top2[:, 0] - top2[:, 1], rtol=1e-12, atol=1e-12)
        assert torch.equal(c.certified, (z.argmax(1) == y) & (top2[:, 0] > top2[:, 1]))


@pytest.mark.parametrize("bound", ["local", "global"])
def test_misclassified_points_are_never_certified(bound):
    model = trained("dense", "maxmin")
    x, y = _points()
    c = _cert(model, x, y, 0.1, bound)
    assert c.certified.any()
    wrong = (c.prediction + 1) % 3
    cw = _cert(model, x, wrong, 0.1, bound)
    assert not cw.correct.any() and not cw.certified.any()
    assert torch.equal(cw.robust, c.robust)  # robustness is about the prediction, not the label


def _scaled_model(scale: float, dtype):
    """Every hidden layer's weights scaled to ~1e-5; biases keep a mix of active and inactive neurons."""
    torch.manual_seed(5)
    model = _dense("relu")
    with torch.no_grad():
        for lin in (model[1], model[3]):
            lin.weight.mul_(scale)
            lin.bias.copy_(scale * torch.randn(lin.bias.shape))
    return model.to(dtype).eval()


def _explicit(op: AffineOp) -> torch.Tensor:
    n = math.prod(op.in_shape)
    with torch.no_grad():
        basis = torch.eye(n, dtype=op.weight.dtype).view(n, *op.in_shape)
        zero = op.forward(torch.zeros((1,) + tuple(op.in_shape), dtype=op.weight.dtype))
        return (op.forward(basis) - zero).reshape(n, -1).T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tiny_weights_are_not_under_estimated(dtype):
    model = _scaled_model(1e-5, dtype)
    x, _ = _points(6)
    x = x.to(dtype)
    ops, acts = network_layers(model)
    exact = [torch.linalg.svdvals(_explicit(op).double())[0] for op in ops[:-1]]
    g = global_bound(model, method="guaranteed")
    assert torch.all(g.layer_norms.double() >= torch.stack(exact))
    assert float(g.lipschitz) >= float(torch.stack(exact).prod())
    assert 1e-11 < float(g.lipschitz) < 1e-8
    lb = local_bound(model, x, 1e-5, guarantee="estimate", method="power", init="random", work_dtype=None,
                     tol=1e-10 if dtype == torch.float64 else 1e-6, max_iter=20000,
                     generator=torch.Generator().manual_seed(0))
    assert lb.converged.all()
    # Layer by layer against the explicit masked matrices (relative: the numbers are ~1e-5).
    col = torch.ones(6, 16, dtype=torch.float64)
    masked = torch.ones(6, dtype=torch.float64)
    for l, op in enumerate(ops[:-1]):
        row = lb.masks[l].double()
        a = row[:, :, None] * _explicit(op).double()[None] * col[:, None, :]
        ref = torch.linalg.svdvals(a)[:, 0]
        rtol = 1e-6 if dtype == torch.float64 else 1e-3
        assert torch.allclose(lb.layer_norms[:, l].double(), ref, rtol=rtol), (l, lb.layer_norms[:, l], ref)
        masked = masked * ref
        col = row
    assert torch.all(lb.lipschitz.double() >= masked * (1 - (1e-6 if dtype == torch.float64 else 1e-3)))
    assert torch.all(lb.lipschitz <= g.lipschitz)
    assert 0 < float(lb.masks[0].mean()) < 1 or 0 < float(lb.masks[1].mean()) < 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("last_bias", [True, False])
def test_tiny_weights_certify_nothing_wrongly(dtype, last_bias):
    model = _scaled_model(1e-5, dtype)
    if not last_bias:
        with torch.no_grad():
            model[-1].bias.zero_()  # logits differ by ~1e-10: margins and bounds are both tiny
    x, y = _points()
    x = x.to(dtype)
    with torch.no_grad():
        pred = model(x).argmax(1)
    gen = torch.Generator().manual_seed(0)
    for eps in (1e-3, 0.1, 2.0):
        attacked = pgd_l2(model, x, pred, eps, steps=50, restarts=5, generator=gen)
        for bound in ("local", "global"):
            c = _cert(model, x, pred, eps, bound)
            # float32 logits carry rounding of ~1e-7 relative; the bound is computed by another formula.
            slack = 0.0 if dtype == torch.float64 else 1e-6 * float(model(x).detach().abs().max())
            assert torch.all(c.worst_margin <= attacked + slack), (bound, eps, (c.worst_margin - attacked).max())
            assert torch.all(attacked[c.certified] > 0)


@pytest.mark.parametrize("bound", ["local", "global"])
def test_batch_of_one(bound):
    model = trained("conv", "clipped_maxmin")
    x, y = _points(1)
    c = _cert(model, x, y, 0.1, bound)
    for t in (c.prediction, c.correct, c.robust, c.certified, c.worst_margin, c.bound, c.converged):
        assert t.shape == (1,)
    lb = local_bound(model, x, 0.1, init="random", generator=torch.Generator().manual_seed(0))
    assert lb.lipschitz.shape == (1,) and lb.layer_norms.shape == (1, 3)


@pytest.mark.parametrize("kind,act,eps", [("conv", "clipped_relu", 0.15), ("dense", "clipped_maxmin", 0.3),
                                          ("conv", "maxmin", 0.3)])
def test_mixed_batch_equals_each_point_alone(kind, act, eps):
    model = trained(kind, act)
    x, y = _points()
    # Default settings (float32 power iterations, tol 1e-6), then converged float64 iterations; the random
    # starts differ between the batch and the single points, so only the convergence error may differ.
    settings = [({}, 1e-4), (dict(tol=1e-12, max_iter=20000, work_dtype=torch.float64), 1e-8)]
    for bound in ("local", "global"):
        for kw, rtol in settings:
            together = _cert(model, x, y, eps, bound, **kw)
            alone = [_cert(model, x[i:i + 1], y[i:i + 1], eps, bound,
                           generator=torch.Generator().manual_seed(100 + i), **kw) for i in range(len(y))]
            assert torch.equal(together.certified, torch.cat([a.certified for a in alone])), (bound, kw)
            assert torch.equal(together.prediction, torch.cat([a.prediction for a in alone]))
            margin_alone = torch.cat([a.worst_margin for a in alone])
            assert torch.allclose(together.worst_margin, margin_alone, rtol=rtol, atol=rtol), (bound, kw)
            if bound == "local":
                assert together.certified.any() and not together.certified.all()  # really a mixed batch


def test_not_converged_falls_back_to_global():
    model = trained("conv", "clipped_relu")
    x, y = _points()
    loc = _cert(model, x, y, 0.15, "local", guarantee="estimate", max_iter=2, tol=1e-14, cascade=False)
    glo = _cert(model, x, y, 0.15, "global")
    assert not loc.converged.any()
    assert torch.equal(loc.certified, glo.certified)
    assert torch.allclose(loc.worst_margin, glo.worst_margin)


def test_not_converged_estimates_decide_nothing_in_the_cascade():
    model = trained("conv", "clipped_relu")
    x, y = _points()
    loc = _cert(model, x, y, 0.15, "local", guarantee="estimate", max_iter=2, tol=1e-14)
    box = _cert(model, x, y, 0.15, "local", masked=False)
    assert torch.equal(loc.certified, box.certified)
    assert torch.equal(loc.worst_margin, box.worst_margin)


def test_certify_validates_arguments_and_restores_mode():
    model = trained("dense", "relu").train()
    x, y = _points(4)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            certify(model, x, y, bad)
    with pytest.raises(ValueError):
        certify(model, x, y, 0.1, bound="other")
    with pytest.raises(ValueError):
        certify(model, x, y[:3], 0.1)
    certify(model, x, y, 0.1, generator=torch.Generator().manual_seed(0))
    assert model.training
    c = certify(model.eval(), x, y, 0.1, generator=torch.Generator().manual_seed(0))
    assert not model.training
    assert c.level == "probabilistic" and c.guarantee.startswith("sound") and "1e-09" in c.guarantee
    c = certify(model, x, y, 0.1, generator=torch.Generator().manual_seed(0), cascade=False)
    assert c.level == "probabilistic" and c.guarantee.startswith("probabilistic") and "1e-09" in c.guarantee
    e = certify(model, x, y, 0.1, guarantee="estimate", generator=torch.Generator().manual_seed(0), cascade=False)
    assert e.guarantee.startswith("estimate, not a guarantee") and "Lanczos" in e.guarantee
    e = certify(model, x, y, 0.1, guarantee="estimate", generator=torch.Generator().manual_seed(0))
    assert e.guarantee.startswith("estimate, not a guarantee")
    with pytest.raises(ValueError):
        certify(model, x, y, 0.1, guarantee="approximate")
    assert _cert(model, x, y, 0.1, "global").guarantee.startswith("upper bound")


def _flat_spectrum_net(margin_fraction: float):
    """One hidden ReLU layer W = U diag(s) V^T with a nearly flat spectrum (s from 1 to 0.98: slow power
    iteration), all ReLUs active on the ball (the net is affine there), and w_0 - w_1 = u_1, so the true
    worst margin on B(x, eps) is exactly clean - eps * s_1. The clean margin is eps * (1 - margin_fraction)."""
    d, eps = 16, 0.5
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    w = u @ torch.diag(torch.linspace(1.0, 0.98, d, dtype=DT)) @ v.T
    model = LipschitzNet(nn.Flatten(), nn.Linear(d, d), make_activation("relu", (d,)), nn.Linear(d, 2),
                         input_shape=(1, 4, 4), num_classes=2).to(DT).eval()
    x = torch.full((1, 1, 4, 4), 0.5, dtype=DT)
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.fill_(10.0)
        model[3].weight.zero_()
        model[3].weight[0] = u[:, 0]
        h = model[2](model[1](model[0](x)))
        model[3].bias.copy_(torch.tensor([eps * (1 - margin_fraction) - float(u[:, 0] @ h[0]), 0.0], dtype=DT))
    return model, x, torch.tensor([0]), eps


def test_flat_spectrum_net_is_tight():
    """The construction below: the margin bound is exact up to the power iteration (true worst margin
    -2e-5 is found by PGD); with float64 iterations to 1e-10 the point is correctly not certified."""
    model, x, y, eps = _flat_spectrum_net(4e-5)
    attacked = pgd_l2(model, x, y, eps, steps=50, restarts=5, generator=torch.Generator().manual_seed(0))
    assert float(attacked[0]) == pytest.approx(-2e-5, rel=1e-3)
    c = certify(model, x, y, eps, "local", guarantee="estimate", tol=1e-10, max_iter=100000, work_dtype=None,
                generator=torch.Generator().manual_seed(0))
    assert c.converged.all() and not c.certified.any()
    assert not certify(model, x, y, eps, "global").certified.any()


@pytest.mark.parametrize("level,method", [
    ("estimate", "lanczos"),
    ("estimate", "power"),
    ("probabilistic", "lanczos"),
    ("exact", "lanczos"),
])
def test_default_certify_survives_pgd_on_flat_spectrum(level, method):
    model, x, y, eps = _flat_spectrum_net(4e-5)
    c = certify(model, x, y, eps, "local", guarantee=level, method=method, generator=torch.Generator().manual_seed(0))
    attacked = pgd_l2(model, x, y, eps, steps=50, restarts=5, generator=torch.Generator().manual_seed(0))
    assert not torch.any(c.certified & (attacked <= 0)), (float(c.bound[0]), float(c.worst_margin[0]),
                                                            float(attacked[0]))


@pytest.mark.parametrize("level", ["probabilistic", "exact", "estimate"])
def test_batched_certify_survives_pgd_with_low_rank_sample(level):
    """Sample A: 3 of 16 ReLUs on (the other 13 off on the whole ball), margin direction = top left singular
    vector of D_A W, clean margin 0.9 * eps * ||D_A W||: not robust. Sample B: every ReLU on."""
    d, eps = 16, 0.1
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d, d, generator=g, dtype=DT) / 4
    model = LipschitzNet(nn.Flatten(), nn.Linear(d, d), make_activation("relu", (d,)), nn.Linear(d, 2),
                         input_shape=(1, 4, 4), num_classes=2).to(DT).eval()
    z_a = torch.full((d,), -5.0, dtype=DT)
    z_a[:3] = 5.0
    z_b = torch.full((d,), 5.0, dtype=DT)
    x = torch.linalg.solve(w, torch.stack([z_a, z_b]).T).T.reshape(2, 1, 4, 4)
    d_a = (z_a > 0).to(DT)
    u, s, _ = torch.linalg.svd(d_a[:, None] * w)
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.zero_()
        model[3].weight.zero_()
        model[3].weight[0] = u[:, 0]
        model[3].bias.copy_(torch.tensor([eps * float(s[0]) * 0.9 - float(u[:, 0] @ torch.relu(z_a)), 0.0], dtype=DT))
        y = model(x).argmax(1)
    attacked = pgd_l2(model, x, y, eps, steps=50, restarts=5, generator=torch.Generator().manual_seed(0))
    assert float(attacked[0]) < 0  # sample A is not robust
    alone = certify(model, x[:1], y[:1], eps, "local", guarantee=level, generator=torch.Generator().manual_seed(0))
    assert not alone.certified.any()
    both = certify(model, x, y, eps, "local", guarantee=level, generator=torch.Generator().manual_seed(0))
    assert not torch.any(both.certified & (attacked <= 0)), (both.bound, float(s[0]))
