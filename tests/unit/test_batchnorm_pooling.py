"""BatchNorm (folded into the layer before it) and AvgPool2d (an affine layer type) in the bounds.

* ``fold_batchnorm`` gives the eval-mode network exactly (up to one rounding of the folded weights):
  the network certifies point for point, step for step, like its twin folded by hand here.
* AvgPool2d's operator, row norms and guaranteed norm agree with its explicit matrix; joined to the
  Conv2d or Linear next to it (``ComposedLayer``) the same holds for the composition.
* Every local-bound level is sound on a network with pooling (never below the true masked norm),
  and every certificate of the cascade with the linear relaxation survives PGD.
* Pooling and BatchNorm round-trip through ``describe``, JSON and ``build``; what cannot be folded
  or built is refused in one line naming the layer.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from locallip.attack import pgd_l2
from locallip.bounds import global_bound, local_bound, network_layers
from locallip.bounds.layers import AvgPoolLayer, ComposedLayer
from locallip.certify import STEP, certify
from locallip.nn.activations import ClippedReLU, ReLU
from locallip.nn.describe import UnsupportedModel, build, describe, load_weights, weights_of
from locallip.nn.fold import fold_batchnorm
from locallip.nn.models import LipschitzNet

DT = torch.float64
SHAPE = (2, 8, 8)
pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")


def _randomise_stats(bn: nn.Module, gen: torch.Generator) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
        bn.running_var.copy_(0.3 + 2 * torch.rand(n, generator=gen))
        if bn.affine:
            bn.weight.copy_(0.5 + torch.rand(n, generator=gen))
            bn.bias.copy_(0.4 * torch.rand(n, generator=gen) - 0.2)


def _bn_net(seed: int, dtype=DT) -> LipschitzNet:
    """Conv, BN, ReLU, pool, conv, BN (no affine), ReLU, pool, Linear, BN1d, ReLU, Linear."""
    torch.manual_seed(seed)
    net = LipschitzNet(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), ReLU(), nn.AvgPool2d(2),
                       nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                       nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.BatchNorm1d(16, eps=1e-3), ReLU(),
                       nn.Linear(16, 4), input_shape=SHAPE, num_classes=4)
    gen = torch.Generator().manual_seed(seed + 100)
    for m in net:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            _randomise_stats(m, gen)
    return net.to(dtype).eval()


def _hand_folded(net: nn.Sequential) -> LipschitzNet:
    """The same network with each BN folded by hand, written out for this test."""
    mods = []
    for m in net:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            layer = mods[-1]
            gamma = m.weight.double() if m.affine else torch.ones(m.num_features, dtype=DT)
            beta = m.bias.double() if m.affine else torch.zeros(m.num_features, dtype=DT)
            s = gamma / torch.sqrt(m.running_var.double() + m.eps)
            b = layer.bias.double() if layer.bias is not None else torch.zeros(m.num_features, dtype=DT)
            new = (nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                             dtype=DT)
                   if isinstance(layer, nn.Conv2d) else nn.Linear(layer.in_features, layer.out_features, dtype=DT))
            with torch.no_grad():
                new.weight.copy_(layer.weight.double() * s.view(-1, *[1] * (layer.weight.dim() - 1)))
                new.bias.copy_(s * (b - m.running_mean.double()) + beta)
            mods[-1] = new.to(layer.weight.dtype)
        else:
            mods.append(m)
    return LipschitzNet(*mods, input_shape=net.input_shape, num_classes=net.num_classes).eval()


def _x(n: int, seed: int, dtype=DT) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --------------------------------------------------------------------------- BatchNorm folding


@pytest.mark.parametrize("dtype", [torch.float32, DT])
def test_a_batchnorm_network_certifies_like_its_hand_folded_twin(dtype):
    net = _bn_net(0, dtype)
    folded, twin = fold_batchnorm(net), _hand_folded(net)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net)  # the user's model is not changed
    x = _x(96, 1, dtype)
    logits = net(x)
    tol = 1e-12 if dtype == DT else 1e-5
    assert torch.allclose(folded(x), logits, atol=tol, rtol=tol)
    assert torch.allclose(twin(x), logits, atol=tol, rtol=tol)
    y = logits.argmax(1)
    seen = set()
    for eps in (0.3, 0.45, 0.7):  # (seed 0: decided by the global, box, exact and linear-relaxation steps)
        a = certify(folded, x, y, eps, generator=torch.Generator().manual_seed(0), linear_relaxation=True)
        b = certify(twin, x, y, eps, generator=torch.Generator().manual_seed(0), linear_relaxation=True)
        assert torch.equal(a.certified, b.certified) and torch.equal(a.step, b.step)
        seen |= set(a.step[a.certified].tolist())
    assert len(seen) >= 3, seen  # the comparison is not all decided by one step


def test_fold_keeps_training_mode_and_a_plain_sequential_plain():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).train()
    folded = fold_batchnorm(net)
    assert type(folded) is nn.Sequential and folded.training and len(folded) == 4
    assert net[1].weight.data_ptr() != folded[1].weight.data_ptr()


@pytest.mark.parametrize("net, message", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2)), "layer 2 (BatchNorm2d) does not directly follow"),
    (nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3)), "layer 0 (BatchNorm2d) does not directly follow"),
    (nn.Sequential(nn.Linear(3, 2), nn.BatchNorm2d(2)), "layer 1 (BatchNorm2d) does not directly follow a Conv2d"),
    (nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.BatchNorm1d(2)), "layer 2 (BatchNorm1d)"),
    (nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2, track_running_stats=False)), "no running statistics"),
])
def test_a_batchnorm_that_cannot_be_folded_is_refused_in_one_line(net, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        fold_batchnorm(net)
    assert "\n" not in str(err.value)


def test_the_bounds_refuse_an_unfolded_batchnorm_and_say_how_to_fold_it():
    with pytest.raises(ValueError, match="BatchNorm2d.*fold_batchnorm"):
        network_layers(_bn_net(0))


# --------------------------------------------------------------------------- AvgPool2d


POOLS = [(2, 2, 0, 8), (3, 3, 0, 7), (2, 1, 0, 5), (3, 1, 1, 6), (3, 2, 1, 7), (4, 2, 1, 9), (1, 1, 0, 4)]


@pytest.mark.parametrize("kernel, stride, padding, size", POOLS)
def test_avgpool_norm_is_guaranteed_and_tight_against_the_svd(kernel, stride, padding, size):
    op = AvgPoolLayer(nn.AvgPool2d(kernel, stride, padding), (3, size, size))
    svd = torch.linalg.matrix_norm(op.explicit_matrix(), ord=2)
    g = op.guaranteed_norm()
    assert svd <= g <= svd * 1.01
    if stride == kernel and padding == 0:  # non-overlapping windows: exactly 1/k
        assert abs(float(g) - 1 / kernel) <= 1e-15


@pytest.mark.parametrize("kernel, stride, padding, size", POOLS)
def test_avgpool_operator_agrees_with_its_explicit_matrix(kernel, stride, padding, size):
    pool = nn.AvgPool2d(kernel, stride, padding)
    op = AvgPoolLayer(pool, (3, size, size)).cast(DT)
    m = op.explicit_matrix()
    gen = torch.Generator().manual_seed(kernel * 10 + size)
    v = torch.randn(4, 3, size, size, generator=gen, dtype=DT)
    u = torch.randn(4, *op.out_shape, generator=gen, dtype=DT)
    mask = (torch.rand(4, 3, size, size, generator=gen) > 0.4).to(DT)
    assert torch.allclose(op.forward(v).flatten(1), v.flatten(1) @ m.T, atol=1e-14)
    assert torch.allclose(op.linear(v).flatten(1), v.flatten(1) @ m.T, atol=1e-14)
    assert torch.allclose(op.transpose(u).flatten(1), u.flatten(1) @ m, atol=1e-14)
    assert torch.allclose(op.abs_linear(v.abs()).flatten(1), v.abs().flatten(1) @ m.abs().T, atol=1e-14)
    rows = (m[None] * mask.flatten(1)[:, None, :]).norm(dim=2)
    assert torch.allclose(op.row_norms(mask).flatten(1), rows, atol=1e-12)


@pytest.mark.parametrize("pool, after", [(nn.AvgPool2d(2), True), (nn.AvgPool2d(3, 1, 1), True),
                                         (nn.AvgPool2d(2), False), (nn.AvgPool2d(3, 2, 1), False)])
def test_pooling_joins_its_neighbour_into_one_sound_layer(pool, after):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(DT)
    net = nn.Sequential(conv, pool) if after else nn.Sequential(pool, conv)
    ops, _ = network_layers(_with_head(net), input_shape=(3, 8, 8))
    op = ops[0]
    assert isinstance(op, ComposedLayer) and len(ops) == 2
    m = op.explicit_matrix()
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(3, 3, 8, 8, generator=gen, dtype=DT)
    mask = (torch.rand(3, 3, 8, 8, generator=gen) > 0.4).to(DT)
    assert torch.allclose(op.forward(v), net(v), atol=1e-13)
    assert torch.allclose(op.linear(v).flatten(1), v.flatten(1) @ m.T, atol=1e-13)
    u = torch.randn(3, *op.out_shape, generator=gen, dtype=DT)
    assert torch.allclose(op.transpose(u).flatten(1), u.flatten(1) @ m, atol=1e-13)
    assert (op.abs_linear(v.abs()).flatten(1) >= v.abs().flatten(1) @ m.abs().T - 1e-13).all()
    rows = (m[None] * mask.flatten(1)[:, None, :]).norm(dim=2)
    got = op.row_norms(mask).flatten(1)
    assert (got >= rows * (1 - 1e-12)).all()
    if not after and pool.stride == pool.kernel_size:  # disjoint windows first: exact
        assert torch.allclose(got, rows, atol=1e-12)
    svd = torch.linalg.matrix_norm(m, ord=2)
    assert op.guaranteed_norm() >= svd
    # the product's rounding is bounded for the exact level, and negligible
    assert 0 < op.explicit_matrix_error() < 1e-13 * float(m.norm())
    if not after and pool.stride == pool.kernel_size:  # W1 W1^T = I / m: the product of the norms is exact
        assert op.guaranteed_norm() <= svd * (1 + 1e-6)


def _with_head(body: nn.Sequential) -> nn.Sequential:
    with torch.no_grad():
        features = body(torch.zeros(1, 3, 8, 8, dtype=DT)).numel()
    return nn.Sequential(*body, ReLU(), nn.Flatten(), nn.Linear(features, 2)).to(DT)


def _pool_net(seed: int) -> nn.Sequential:
    """Pooling in every position: after a conv (before its activation), before a conv, before the logits."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.AvgPool2d(3, 1, 1), ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(6, 6, 3, padding=1), ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(24, 3))
    net.input_shape = SHAPE
    return net.to(DT).eval()


@pytest.mark.parametrize("level", ["probabilistic", "exact", "estimate"])
def test_local_bound_with_pooling_is_never_below_the_true_masked_norm(level):
    net, x = _pool_net(4), _x(12, 4)
    ops, _ = network_layers(net)
    assert len(ops) == 3 and all(isinstance(op, ComposedLayer) for op in ops)
    g = global_bound(net)
    lb = local_bound(net, x, 0.1, level=level, generator=torch.Generator().manual_seed(0), tol=1e-10,
                     work_dtype=None)
    for l, (op, (col, row)) in enumerate(zip(ops[:-1], lb.operator_masks())):
        m = op.explicit_matrix()
        c = torch.ones(x.shape[0], m.shape[1], dtype=DT) if col is None else col.flatten(1).expand(x.shape[0], -1)
        exact = torch.linalg.svdvals(row.flatten(1)[:, :, None] * m[None] * c[:, None, :])[:, 0]
        assert (lb.layer_norms[:, l] <= g.layer_norms[l] * (1 + 1e-12)).all()
        if level == "estimate":
            assert torch.allclose(lb.layer_norms[:, l], exact, rtol=1e-5)
        else:
            assert (lb.layer_norms[:, l] >= exact * (1 - 1e-12)).all()


def test_the_linear_relaxation_through_pooling_never_exceeds_an_attack():
    from locallip.bounds import worst_margin
    from locallip.bounds.linear_relaxation import linear_relaxation_margins

    net, x = _pool_net(5), _x(16, 5)
    y = net(x).argmax(1)
    for eps in (0.05, 0.3, 0.6):
        bound = worst_margin(linear_relaxation_margins(net, x, y, eps), y)
        found = pgd_l2(net, x, y, eps, steps=50, restarts=3, generator=torch.Generator().manual_seed(2))
        assert (bound <= found).all(), eps  # a lower bound of the true minimum, which PGD bounds from above
        assert torch.isfinite(bound).all()


def test_certificates_of_a_network_with_pooling_and_batchnorm_survive_pgd():
    net = fold_batchnorm(_bn_net(0))
    x = _x(64, 6)
    y = net(x).argmax(1)
    steps = set()
    for eps in (0.3, 0.45, 0.7):
        c = certify(net, x, y, eps, generator=torch.Generator().manual_seed(0), linear_relaxation=True)
        glob = certify(net, x, y, eps, "global")
        assert not (glob.certified & ~c.certified).any()
        idx = c.certified.nonzero().squeeze(1)
        steps |= set(c.step[idx].tolist())
        if idx.numel():
            am = pgd_l2(net, x[idx], y[idx], eps, steps=50, restarts=3, generator=torch.Generator().manual_seed(1))
            assert (am > 0).all(), eps  # 0 broken
    assert STEP["global"] in steps and len(steps) >= 3, steps


@pytest.mark.parametrize("net", [
    nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2)),
    nn.Sequential(nn.AvgPool2d(2), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
])
def test_a_pooling_layer_between_two_activations_is_refused_in_one_line(net):
    with pytest.raises(ValueError, match="AvgPool2d must sit next to a Conv2d or Linear layer") as err:
        network_layers(net, input_shape=SHAPE)
    assert "\n" not in str(err.value)


def test_two_poolings_join_the_layer_after_them():
    net = nn.Sequential(nn.AvgPool2d(2), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 2)).to(DT)
    (op,), _ = network_layers(net, input_shape=SHAPE)
    m = op.explicit_matrix()
    assert torch.allclose(op.guaranteed_norm(), torch.linalg.matrix_norm(m, ord=2), rtol=1e-12)
    x = _x(3, 9)
    assert torch.allclose(op.forward(x), net(x), atol=1e-14)


def test_calibration_still_finds_the_activations_around_pooling():
    net = LipschitzNet(nn.Conv2d(2, 4, 3, padding=1), ClippedReLU((4, 8, 8)), nn.AvgPool2d(2), nn.Flatten(),
                       nn.Linear(64, 8), ClippedReLU((8,)), nn.Linear(8, 3), input_shape=SHAPE, num_classes=3)
    ops, acts = network_layers(net)
    assert acts == [net[1], net[5]]
    # one warm-start vector per operator the bounds see, shaped like its input
    assert [v.numel() for v in net.power_vectors()] == [op.in_features for op in ops]
    assert global_bound(net, method="power", iters=3).layer_norms.shape == (2,)


# --------------------------------------------------------------------------- describe, JSON, build


def test_pooling_and_batchnorm_round_trip_through_describe_and_json():
    net = _bn_net(7, torch.float32)
    text = json.dumps(describe(net, SHAPE))
    kinds = [spec["type"] for spec in json.loads(text)["layers"]]
    assert kinds.count("batchnorm2d") == 2 and kinds.count("batchnorm1d") == 1 and kinds.count("avgpool2d") == 2
    rebuilt = load_weights(build(json.loads(text)), weights_of(net)).eval()
    x = _x(32, 7, torch.float32)
    assert torch.equal(rebuilt(x), net(x))
    for a, b in zip(net, rebuilt):
        assert type(a).__name__ == type(b).__name__  # (torch's ReLU comes back as locallip's)
        if isinstance(a, nn.AvgPool2d):
            assert [_pair(getattr(a, k)) for k in ("kernel_size", "stride", "padding")] == \
                   [_pair(getattr(b, k)) for k in ("kernel_size", "stride", "padding")]
        if isinstance(a, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert (a.eps, a.affine, a.num_features) == (b.eps, b.affine, b.num_features)
            assert torch.equal(a.running_var, b.running_var) and torch.equal(a.running_mean, b.running_mean)
    assert torch.equal(fold_batchnorm(rebuilt)(x), fold_batchnorm(net)(x))


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _description(layer: dict) -> dict:
    return {"input_shape": [2, 8, 8], "layers": [layer, {"type": "flatten"}, {"type": "linear", "in_features": 32,
                                                                              "out_features": 3}]}


@pytest.mark.parametrize("layer, message", [
    ({"type": "avgpool2d"}, "layer 0 (avgpool2d): missing kernel_size"),
    ({"type": "avgpool2d", "kernel_size": "2"}, "layer 0 (avgpool2d): kernel_size must be an integer"),
    ({"type": "avgpool2d", "kernel_size": 2, "stride": 0}, "layer 0 (avgpool2d): stride must be an integer"),
    ({"type": "avgpool2d", "kernel_size": [2, 2, 2]}, "kernel_size must be an integer or a pair"),
    ({"type": "avgpool2d", "kernel_size": 2, "padding": 2}, "layer 0 (avgpool2d) does not fit its input"),
    ({"type": "avgpool2d", "kernel_size": 9}, "layer 0 (avgpool2d) does not fit its input"),
    ({"type": "batchnorm2d"}, "layer 0 (batchnorm2d): missing num_features"),
    ({"type": "batchnorm2d", "num_features": 2, "eps": -1}, "layer 0 (batchnorm2d): eps must be a number"),
    ({"type": "batchnorm2d", "num_features": 2, "affine": "yes"}, "affine must be true or false"),
    ({"type": "batchnorm2d", "num_features": 3}, "layer 0 (batchnorm2d) does not fit its input"),
])
def test_a_malformed_pooling_or_batchnorm_description_is_one_line(layer, message):
    with pytest.raises(UnsupportedModel) as err:
        build(_description(layer))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_describe_refuses_pooling_and_batchnorm_it_cannot_certify():
    for module, message in ((nn.AvgPool2d(2, ceil_mode=True), "ceil_mode=True"),
                            (nn.AvgPool2d(2, count_include_pad=False), "count_include_pad=False"),
                            (nn.BatchNorm2d(2, track_running_stats=False), "without running statistics")):
        with pytest.raises(UnsupportedModel, match=message):
            describe(nn.Sequential(nn.Conv2d(2, 2, 1), module, nn.Flatten(), nn.Linear(32, 3)), SHAPE)
