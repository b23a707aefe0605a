"""Activations: forward definitions, interval and mask rules, and mask soundness inside real networks.

The model-level test checks the promise the local bound rests on: at random points
of B(x, eps) and at PGD points that push pre-activations toward their bounds and
fixed neurons toward their thresholds, every pre-activation stays inside the
reported [lb, ub] and every output marked fixed keeps its clean value exactly.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from locallip.nn.activations import ClippedMaxMin, ClippedReLU, LipschitzActivation, MaxMin, ReLU, make_activation
from locallip.bounds import local_bound, network_layers
from locallip.bounds.empirical import random_points_in_ball
from net_helpers import fit_briefly
from locallip.nn.models import LipschitzNet, build_model

DT = torch.float64
ACTS = ["relu", "clipped_relu", "maxmin", "clipped_maxmin"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _act(name: str, shape, seed: int = 0) -> LipschitzActivation:
    act = make_activation(name, shape).to(DT)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in act.parameters():  # thresholds in (0.1, 1.1): both clamps reachable by the test boxes
            p.copy_(0.1 + torch.rand(p.shape, generator=g, dtype=DT))
    return act


def _boxes(shape, batch: int, seed: int, width: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    center = 2.5 * torch.randn((batch,) + tuple(shape), generator=g, dtype=DT) * 0.6
    half = width * torch.rand((batch,) + tuple(shape), generator=g, dtype=DT)
    return center - half, center + half


def _points_in_box(lb, ub, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((n,) + tuple(lb.shape), generator=g, dtype=DT)
    corners = (torch.rand((n,) + tuple(lb.shape), generator=g) < 0.5).to(DT)
    pts = torch.minimum(torch.maximum(lb + u * (ub - lb), lb), ub)
    pts[: n // 2] = torch.where(corners[: n // 2] > 0, ub, lb)  # half of them at corners of the box
    return pts


SHAPES = [(8,), (4, 3, 3)]


# --------------------------------------------------------------------------- definitions


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_definitions(shape):
    z = torch.randn((5,) + shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert torch.equal(_act("relu", shape)(z), z.clamp_min(0))
    cr = _act("clipped_relu", shape)
    assert torch.equal(cr(z), torch.minimum(z.clamp_min(0), cr.theta))
    a, b = z[:, : shape[0] // 2], z[:, shape[0] // 2:]
    mm = _act("maxmin", shape)(z)
    assert torch.equal(mm, torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1))
    cm = _act("clipped_maxmin", shape)
    ref = torch.cat([torch.minimum(torch.maximum(a, b), cm.theta_hi), torch.maximum(torch.minimum(a, b), -cm.theta_lo)], 1)
    assert torch.equal(cm(z), ref)
    # MaxMin is a permutation per pair: it preserves the norm (gradient-norm preserving).
    assert torch.allclose(mm.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1))


@pytest.mark.parametrize("name", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_one_lipschitz(name, shape):
    act = _act(name, shape)
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn((200,) + shape, generator=g, dtype=DT)
    z2 = z1 + 0.3 * torch.randn((200,) + shape, generator=g, dtype=DT)
    d_out = (act(z1) - act(z2)).flatten(1).norm(dim=1)
    d_in = (z1 - z2).flatten(1).norm(dim=1)
    assert torch.all(d_out <= d_in * (1 + 1e-12))


# --------------------------------------------------------------------------- interval, masks, fixed distance


@pytest.mark.parametrize("name", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_interval_is_sound_and_exact(name, shape):
    act = _act(name, shape)
    lb, ub = _boxes(shape, 6, seed=2)
    lo, hi = act.interval(lb, ub)
    # Every activation here is monotone per output in the box order: the ends are attained at lb and ub.
    assert torch.equal(lo, act(lb)) and torch.equal(hi, act(ub))
    pts = _points_in_box(lb, ub, 200, seed=3)
    out = act(pts.flatten(0, 1)).view(pts.shape)
    assert torch.all(out >= lo) and torch.all(out <= hi)


@pytest.mark.parametrize("name", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_masks_are_sound(name, shape):
    act = _act(name, shape)
    lb, ub = _boxes(shape, 6, seed=4)
    in_mask, out_mask = act.masks(lb, ub)
    assert in_mask.shape == out_mask.shape == lb.shape and in_mask.dtype == lb.dtype
    assert set(torch.unique(in_mask).tolist()) <= {0.0, 1.0} and set(torch.unique(out_mask).tolist()) <= {0.0, 1.0}
    assert torch.all(out_mask <= in_mask)
    if name != "maxmin":
        assert (out_mask == 0).any() and (out_mask == 1).any()  # the boxes exercise both cases
    p1, p2 = _points_in_box(lb, ub, 300, seed=5), _points_in_box(lb, ub, 300, seed=6)
    d = act(p1.flatten(0, 1)).view(p1.shape) - act(p2.flatten(0, 1)).view(p2.shape)
    assert torch.all(d * (1 - out_mask) == 0)  # fixed outputs are constant on the box
    assert torch.all(d.flatten(2).norm(dim=2) <= ((p1 - p2) * in_mask).flatten(2).norm(dim=2) * (1 + 1e-12))


@pytest.mark.parametrize("name", ACTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_masks_are_tight(name, shape):
    """With thresholds > 0 and a box with lb < ub, an output marked varying does vary (f(lb) != f(ub)),
    so the masks do not throw away fixed neurons."""
    act = _act(name, shape)
    lb, ub = _boxes(shape, 6, seed=7)
    _, out_mask = act.masks(lb, ub)
    assert torch.equal(out_mask.bool(), act(lb) != act(ub))


@pytest.mark.parametrize("name", ACTS)
def test_fixed_distance_is_zero_exactly_on_fixed_neurons(name):
    shape = (6, 2, 2)
    act = _act(name, shape)
    lb, ub = _boxes(shape, 8, seed=8)
    d = act.fixed_distance(lb, ub)
    if name == "maxmin":
        assert d is None
        return
    _, out_mask = act.masks(lb, ub)
    assert torch.all(d >= 0)
    assert torch.equal(d == 0, out_mask == 0)


def test_masks_at_the_thresholds():
    """Boundary cases: ub == 0 is off, lb == theta is saturated (both constant on the box)."""
    relu, crelu = ReLU(), ClippedReLU((3,), theta_init=1.0).to(DT)
    lb = torch.tensor([[-1.0, 1.0, -1.0]], dtype=DT)
    ub = torch.tensor([[0.0, 2.0, 1e-300]], dtype=DT)
    assert relu.masks(lb, ub)[1].tolist() == [[0.0, 1.0, 1.0]]
    assert crelu.masks(lb, ub)[1].tolist() == [[0.0, 0.0, 1.0]]
    cm = ClippedMaxMin((2,), theta_init=1.0).to(DT)
    # pair (a, b): max >= theta_hi fixes the max output; min <= -theta_lo fixes the min output
    lb = torch.tensor([[1.0, -5.0], [0.0, -1.0], [0.5, -1.0]], dtype=DT)
    ub = torch.tensor([[2.0, -1.0], [0.5, 0.5], [3.0, 3.0]], dtype=DT)
    in_mask, out_mask = cm.masks(lb, ub)
    assert out_mask.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    assert in_mask.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    lb = torch.tensor([[1.0, 1.0]], dtype=DT)  # max fixed at theta_hi, min free
    ub = torch.tensor([[2.0, 2.0]], dtype=DT)
    in_mask, out_mask = cm.masks(lb, ub)
    assert out_mask.tolist() == [[0.0, 1.0]] and in_mask.tolist() == [[1.0, 1.0]]


# --------------------------------------------------------------------------- thresholds and construction


def test_thresholds_clamp_scale_and_mean():
    cr = ClippedReLU((4,), theta_init=0.5)
    cm = ClippedMaxMin((4,), theta_init=0.5)
    assert cr.has_thresholds and cm.has_thresholds and not ReLU.has_thresholds and not MaxMin.has_thresholds
    assert cr.theta.shape == (4,) and cm.theta_hi.shape == (2,) and cm.theta_lo.shape == (2,)
    with torch.no_grad():
        cr.theta.copy_(torch.tensor([-1.0, 0.5, 2.0, -0.1]))
        cm.theta_lo.copy_(torch.tensor([-3.0, 1.0]))
    cr.clamp_thresholds_()
    cm.clamp_thresholds_()
    assert cr.theta.tolist() == [0.0, 0.5, 2.0, 0.0] and cm.theta_lo.tolist() == [0.0, 1.0]
    cr.scale_thresholds_(2.0)
    assert cr.theta.tolist() == [0.0, 1.0, 4.0, 0.0]
    assert cr.threshold_mean() == pytest.approx(1.25)
    assert cm.threshold_mean() == pytest.approx((0.5 + 0.5 + 0.0 + 1.0) / 4)
    assert ReLU().threshold_mean() is None


def test_make_activation_and_errors():
    assert isinstance(make_activation("relu", (4,)), ReLU)
    assert isinstance(make_activation("clipped_relu", (4,), 0.3), ClippedReLU)
    assert isinstance(make_activation("maxmin", (4,)), MaxMin)
    assert isinstance(make_activation("clipped_maxmin", (4, 2, 2)), ClippedMaxMin)
    assert float(make_activation("clipped_relu", (4,), 0.3).theta[0].detach()) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        make_activation("tanh", (4,))
    with pytest.raises(ValueError):
        ClippedMaxMin((3,))
    with pytest.raises(ValueError):
        MaxMin()(torch.zeros(2, 3))


def test_threshold_gradients():
    cr = ClippedReLU((3,), theta_init=0.5)
    z = torch.tensor([[1.0, 0.2, -1.0]])
    cr(z).sum().backward()
    assert cr.theta.grad.tolist() == [1.0, 0.0, 0.0]
    cm = ClippedMaxMin((2,), theta_init=0.5)
    cm(torch.tensor([[2.0, -3.0]])).sum().backward()
    assert cm.theta_hi.grad.tolist() == [1.0] and cm.theta_lo.grad.tolist() == [-1.0]


# --------------------------------------------------------------------------- masks inside networks (soundness)


def _randomize_thresholds(model, gen):
    with torch.no_grad():
        for m in model.modules():
            for name in ("theta", "theta_hi", "theta_lo"):
                p = getattr(m, name, None)
                if isinstance(p, nn.Parameter):
                    p.copy_(0.05 + 0.55 * torch.rand(p.shape, generator=gen))


def _tiny(kind: str, act: str) -> LipschitzNet:
    if kind == "dense":
        return LipschitzNet(nn.Flatten(), nn.Linear(9, 12), make_activation(act, (12,)), nn.Linear(12, 10),
                            make_activation(act, (10,)), nn.Linear(10, 3), input_shape=(1, 3, 3), num_classes=3)
    if kind == "conv":
        return LipschitzNet(nn.Conv2d(1, 4, 3, stride=1, padding=1), make_activation(act, (4, 5, 5)),
                            nn.Conv2d(4, 6, 3, stride=2, padding=1), make_activation(act, (6, 3, 3)), nn.Flatten(),
                            nn.Linear(54, 8), make_activation(act, (8,)), nn.Linear(8, 3),
                            input_shape=(1, 5, 5), num_classes=3)
    return build_model(kind, act, (1, 8, 8), num_classes=3)


@functools.lru_cache(maxsize=None)
def _model(kind: str, act: str, trained: bool) -> LipschitzNet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _tiny(kind, act)
    _randomize_thresholds(model, torch.Generator().manual_seed(1))
    if trained:
        g = torch.Generator().manual_seed(2)
        x = torch.rand((64,) + tuple(model.input_shape), generator=g)
        y = ((x.flatten(1) - 0.5) @ torch.randn(x[0].numel(), 3, generator=g)).argmax(1)
        fit_briefly(model, x, y, steps=40, lr=3e-3)
    return model.to(DT).eval()


def _forward_all(model, x):
    ops, acts = network_layers(model)
    zs, hs, h = [], [], x
    for op, act in zip(ops[:-1], acts):
        z = op.forward(h)
        h = act(z)
        zs.append(z)
        hs.append(h)
    return zs, hs


def _escape(act, z, off):
    """Per output: > 0 exactly when the output has left the fixed value it has on the fixed side
    (``off``: the neuron is fixed because ub <= 0, else because it saturates). Only read where fixed."""
    if isinstance(act, (ReLU, nn.ReLU)):
        return z
    if isinstance(act, ClippedReLU):
        return torch.where(off, z, act.theta - z)
    if isinstance(act, ClippedMaxMin):
        a, b = z.chunk(2, dim=1)
        return torch.cat([act.theta_hi - torch.maximum(a, b), torch.minimum(a, b) + act.theta_lo], dim=1)
    return torch.full_like(z, -1.0)  # MaxMin: never fixed


def _check_points(model, lb_res, zs, hs, clean_hs, sample_index):
    """Every pre-activation within [lb, ub]; every fixed output equal to its clean value."""
    for l, (z, h) in enumerate(zip(zs, hs)):
        lo, hi = (t[sample_index] for t in lb_res.pre_bounds[l])
        tol = 1e-10 * (1 + lo.abs() + hi.abs())
        assert torch.all(z >= lo - tol), (l, float((lo - z).max()))
        assert torch.all(z <= hi + tol), (l, float((z - hi).max()))
        fixed = lb_res.masks[l][sample_index] == 0
        clean = clean_hs[l][sample_index]
        assert torch.equal(torch.where(fixed, h, 0.0), torch.where(fixed, clean, 0.0)), (
            l, int((fixed & (h != clean)).sum()))


MASK_CASES = [(k, a, t) for k in ("dense", "conv") for a in ACTS for t in (False, True)] + \
             [("2c2f", a, False) for a in ACTS]


@pytest.mark.parametrize("kind,act,trained", MASK_CASES)
def test_masks_sound_in_network_under_attack(kind, act, trained):
    model = copy.deepcopy(_model(kind, act, trained))
    _, acts = network_layers(model)
    b = 3
    x = torch.rand((b,) + tuple(model.input_shape), generator=torch.Generator().manual_seed(3), dtype=DT)
    eps = torch.tensor([0.05, 0.2, 0.6], dtype=DT)
    with torch.no_grad():
        res = local_bound(model, x, eps, guarantee="estimate", method="power", init="random", tol=1e-10,
                          max_iter=20000, work_dtype=None,
                          generator=torch.Generator().manual_seed(4))
        assert res.converged.all()
        clean_zs, clean_hs = _forward_all(model, x)
    n_fixed = sum(int((m == 0).sum()) for m in res.masks)
    if act != "maxmin":
        assert n_fixed > 0  # otherwise the test checks nothing about fixed neurons

    # Random points of the ball.
    n = 64
    pts = random_points_in_ball(x, eps, n, torch.Generator().manual_seed(5))  # [n, B, ...]
    with torch.no_grad():
        zs, hs = _forward_all(model, pts.flatten(0, 1))
    idx = torch.arange(b).repeat(n)
    _check_points(model, res, zs, hs, clean_hs, idx)

    # PGD targets per sample and layer: the fixed outputs closest to escaping, and the pre-activations
    # closest to their upper and lower bounds.
    k = 4
    targets = []  # (sample, layer, kind, flat index, sign)
    for l, act_l in enumerate(acts):
        lo, hi = res.pre_bounds[l]
        off = hi <= 0
        esc = _escape(act_l, clean_zs[l], off).flatten(1)
        fixed = (res.masks[l] == 0).flatten(1)
        for s in range(b):
            if fixed[s].any():
                score = torch.where(fixed[s], esc[s], torch.full_like(esc[s], -float("inf")))
                for i in score.topk(min(k, int(fixed[s].sum()))).indices.tolist():
                    targets.append((s, l, "escape", i, 1.0))
            gap_up = (hi - clean_zs[l]).flatten(1)[s]
            gap_dn = (clean_zs[l] - lo).flatten(1)[s]
            for i in gap_up.topk(k, largest=False).indices.tolist():
                targets.append((s, l, "pre", i, 1.0))
            for i in gap_dn.topk(k, largest=False).indices.tolist():
                targets.append((s, l, "pre", i, -1.0))
    sample = torch.tensor([t[0] for t in targets])
    layer = torch.tensor([t[1] for t in targets])
    is_esc = torch.tensor([t[2] == "escape" for t in targets])
    index = torch.tensor([t[3] for t in targets])
    sign = torch.tensor([t[4] for t in targets], dtype=DT)
    x_t, eps_t = x[sample], eps[sample]
    off_t = [(res.pre_bounds[l][1] <= 0)[sample] for l in range(len(acts))]
    shape = (-1,) + (1,) * (x.dim() - 1)
    inside = eps_t * (1 - 64 * torch.finfo(DT).eps)
    gen = torch.Generator().manual_seed(6)
    for restart in range(2):
        if restart == 0:
            delta = torch.zeros_like(x_t)
        else:
            delta = torch.randn(x_t.shape, generator=gen, dtype=DT)
            delta = delta * (0.5 * eps_t / delta.flatten(1).norm(dim=1)).view(shape)
        for _ in range(30):
            delta.requires_grad_(True)
            zs, hs = _forward_all(model, x_t + delta)
            obj = torch.zeros(len(targets), dtype=DT)
            for l, act_l in enumerate(acts):
                i_l = torch.where(layer == l, index, torch.zeros_like(index))[:, None]
                val = torch.where(is_esc, _escape(act_l, zs[l], off_t[l]).flatten(1).gather(1, i_l)[:, 0],
                                  zs[l].flatten(1).gather(1, i_l)[:, 0])
                obj = obj + torch.where(layer == l, sign * val, torch.zeros_like(val))
            grad, = torch.autograd.grad(obj.sum(), delta)
            with torch.no_grad():
                _check_points(model, res, [z.detach() for z in zs], [h.detach() for h in hs], clean_hs, sample)
                gn = grad.flatten(1).norm(dim=1)
                grad = grad / torch.where(gn > 0, gn, torch.ones_like(gn)).view(shape)
                delta = delta + 0.1 * eps_t.view(shape) * grad
                norm = delta.flatten(1).norm(dim=1)
                delta = delta * torch.where(norm > inside, inside / norm, torch.ones_like(norm)).view(shape)
        with torch.no_grad():
            zs, hs = _forward_all(model, x_t + delta)
            _check_points(model, res, zs, hs, clean_hs, sample)
