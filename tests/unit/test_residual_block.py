"""The residual block ``y = x + conv(x)`` (``ResidualConv2d``) as one affine layer ``I + W``.

Oracles from explicit matrices: the explicit matrix is I plus the convolution's; every product of
the bound object (W v, W^T u, |W| v, row norms) agrees with it; the guaranteed norm is never below
the exact SVD and within 1 % of it; the FFT bound alone is never below it; the masked local bound
lies between the exact masked norm and the global one; certificates of block networks survive
PGD, and so do the linear relaxation's margins.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from locallip.attack import pgd_l2
from locallip.bounds import global_bound, local_bound, network_layers
from locallip.bounds.layers import ConvLayer, ResidualConvLayer, affine_layer
from locallip.bounds.linear_relaxation import linear_relaxation_margins
from locallip.certify import certify
from locallip.nn.activations import MaxMin, ReLU
from locallip.nn.blocks import ResidualConv2d
from locallip.nn.models import LipschitzNet

DT = torch.float64
pytestmark = pytest.mark.usefixtures("own_rng", "one_thread")

# (channels, height, width, kernel): one input channel takes the transpose's fold path.
SHAPES = [(1, 5, 5, 3), (2, 6, 5, 3), (4, 6, 6, 3), (3, 4, 4, 5), (2, 5, 5, 1)]


def _block(c: int, k: int, seed: int, scale: float = 1.0, dtype=DT) -> ResidualConv2d:
    torch.manual_seed(seed)
    return ResidualConv2d(c, k, init_scale=scale).to(dtype)


@pytest.mark.parametrize("c,h,w,k", SHAPES)
def test_explicit_matrix_is_identity_plus_the_convolution(c, h, w, k):
    block = _block(c, k, 0)
    op = affine_layer(block, (c, h, w))
    assert isinstance(op, ResidualConvLayer)
    conv = ConvLayer(block.conv, (c, h, w)).explicit_matrix()
    assert torch.equal(op.explicit_matrix(), conv + torch.eye(conv.shape[0], dtype=DT))


@pytest.mark.parametrize("c,h,w,k", SHAPES)
def test_products_agree_with_the_explicit_matrix(c, h, w, k):
    block = _block(c, k, 1)
    op = affine_layer(block, (c, h, w))
    M = op.explicit_matrix()
    g = torch.Generator().manual_seed(2)
    v = torch.randn(3, c, h, w, generator=g, dtype=DT)
    mask = (torch.rand(1, c, h, w, generator=g) > 0.4).to(DT)
    b = block.conv.bias.detach().view(1, -1, 1, 1).expand(1, c, h, w).reshape(1, -1)
    close = dict(rtol=1e-12, atol=1e-12)
    assert torch.allclose(op.forward(v).detach().flatten(1), v.flatten(1) @ M.T + b, **close)
    assert torch.allclose(op.linear(v).detach().flatten(1), v.flatten(1) @ M.T, **close)
    assert torch.allclose(op.transpose(v).detach().flatten(1), v.flatten(1) @ M, **close)
    assert torch.allclose(op.abs_linear(v.abs()).detach().flatten(1), v.abs().flatten(1) @ M.abs().T, **close)
    rows = (M * mask.flatten(1)).norm(dim=1)
    assert torch.allclose(op.row_norms(mask).detach().flatten(), rows, **close)


@pytest.mark.parametrize("c,h,w,k", SHAPES)
@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
def test_guaranteed_norm_is_at_least_the_svd_and_within_one_percent(c, h, w, k, scale):
    block = _block(c, k, 3, scale)
    op = affine_layer(block, (c, h, w))
    exact = torch.linalg.matrix_norm(op.explicit_matrix(), ord=2)
    bound = op.guaranteed_norm()
    assert exact <= bound <= exact * 1.01
    assert op.fft_norm_bound() >= exact  # the FFT bound on its own (used beyond the proof's budget)


def test_guaranteed_norm_of_a_float32_block_covers_the_float64_rounding_of_one_plus_w():
    block = _block(3, 3, 4, 1.0, torch.float32)
    op = affine_layer(block, (3, 5, 5))
    exact = torch.linalg.matrix_norm(op.explicit_matrix(), ord=2)
    assert exact <= op.guaranteed_norm() <= exact * 1.01


def test_a_block_that_changes_the_shape_or_follows_a_normalize_is_refused():
    with pytest.raises(ValueError, match="odd kernel_size"):
        ResidualConv2d(2, 2)
    from locallip.nn.models import Normalize
    with pytest.raises(ValueError, match="Normalize"):
        ResidualConvLayer(_block(1, 3, 0), (1, 4, 4), norm=Normalize([0.5], [0.2]))
    with pytest.raises(ValueError, match="input channels"):
        affine_layer(_block(2, 3, 0), (3, 4, 4))


def _net(seed: int, act=MaxMin, blocks: int = 2, scale: float = 0.5) -> nn.Sequential:
    """stem conv -> act -> blocks (each followed by its activation) -> flatten -> linear logits."""
    torch.manual_seed(seed)
    mods = [nn.Conv2d(1, 4, 3, stride=2, padding=1), act()]
    for _ in range(blocks):
        mods += [ResidualConv2d(4, 3, init_scale=scale), act()]
    mods += [nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    net = nn.Sequential(*mods)
    net.input_shape = (1, 7, 7)
    return net.to(DT).eval()


def _x(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 7, 7, generator=torch.Generator().manual_seed(seed), dtype=DT)


def test_global_bound_uses_the_block_norm_and_training_estimates_it_from_below():
    plain = _net(5).float()
    net = LipschitzNet(*plain, input_shape=plain.input_shape, num_classes=3).to(DT)  # with warm-start vectors
    assert len(net.power_vectors()) == 4
    ops, _ = network_layers(net)
    assert [type(op).__name__ for op in ops] == ["ConvLayer", "ResidualConvLayer", "ResidualConvLayer", "DenseLayer"]
    g = global_bound(net)
    for l in (1, 2):
        exact = torch.linalg.matrix_norm(ops[l].explicit_matrix(), ord=2)
        assert exact <= g.layer_norms[l] <= exact * 1.01
    # The training estimate: warm-started power iteration, from below, converging to the norm.
    net.train()
    first = global_bound(net, method="power", iters=2, update=True).layer_norms.detach()
    for _ in range(60):
        est = global_bound(net, method="power", iters=2, update=True).layer_norms.detach()
    assert (first <= g.layer_norms * (1 + 1e-12)).all()
    assert (est <= g.layer_norms * (1 + 1e-12)).all()
    assert torch.allclose(est[1:3], g.layer_norms[1:3], rtol=1e-3)


@pytest.mark.parametrize("level", ["exact", "probabilistic", "estimate"])
@pytest.mark.parametrize("act", [MaxMin, ReLU])
def test_masked_bound_between_the_exact_masked_norm_and_the_global_one(level, act):
    net, x = _net(6, act), _x(12, 6)
    ops, _ = network_layers(net)
    g = global_bound(net)
    lb = local_bound(net, x, 0.2, level=level, generator=torch.Generator().manual_seed(0), tol=1e-10,
                     work_dtype=None)
    fewer = 0
    for l, (op, (col, row)) in enumerate(zip(ops[:-1], lb.operator_masks())):
        m = op.explicit_matrix()
        c = torch.ones(x.shape[0], m.shape[1], dtype=DT) if col is None else col.flatten(1).expand(x.shape[0], -1)
        exact = torch.linalg.svdvals(row.flatten(1)[:, :, None] * m[None] * c[:, None, :])[:, 0]
        assert (lb.layer_norms[:, l] <= g.layer_norms[l] * (1 + 1e-12)).all()
        if level == "estimate":
            assert torch.allclose(lb.layer_norms[:, l], exact, rtol=1e-6)
        else:
            assert (lb.layer_norms[:, l] >= exact * (1 - 1e-12)).all()
        if l > 0:
            fewer += int((lb.layer_norms[:, l] < g.layer_norms[l] * 0.999).sum())
    if act is ReLU:  # the masks of the blocks do cut their norms (MaxMin without clipping fixes nothing)
        assert fewer > 0


def test_certificates_of_a_block_network_survive_pgd():
    net, x = _net(7, scale=0.3), _x(48, 7)
    y = net(x).argmax(1)
    for eps in (0.05, 0.15):
        glob = certify(net, x, y, eps, "global")
        c = certify(net, x, y, eps, generator=torch.Generator().manual_seed(0))
        assert not (glob.certified & ~c.certified).any()
        idx = c.certified.nonzero().squeeze(1)
        assert idx.numel() > 0
        am = pgd_l2(net, x[idx], y[idx], eps, steps=50, restarts=3, generator=torch.Generator().manual_seed(1))
        assert (am > 0).all()


def test_linear_relaxation_back_substitutes_through_blocks_soundly():
    net, x = _net(8, ReLU, scale=0.3), _x(16, 8)
    y = net(x).argmax(1)
    eps = 0.15
    bound = linear_relaxation_margins(net, x, y, eps)
    others = torch.ones_like(bound, dtype=torch.bool).scatter(1, y.view(-1, 1), False)
    worst = bound.masked_fill(~others, float("inf")).min(1).values
    found = pgd_l2(net, x, y, eps, steps=50, restarts=3, generator=torch.Generator().manual_seed(2))
    assert (worst <= found + 1e-9).all()
    # It certifies at least what the global bound does (it is not a trivial bound).
    g = certify(net, x, y, eps, "global")
    assert int((worst > 0).sum()) >= int(g.certified.sum())


# --------------------------------------------------------------------------- the liresnet architecture


def test_build_model_lays_out_liresnet_and_rebuilds_it_from_its_spec():
    from locallip.nn.models import build_model, model_from_spec

    torch.manual_seed(0)
    net = build_model("liresnet", "clipped_maxmin", (1, 28, 28), 10, depth=3, width=8)
    kinds = [type(m).__name__ for m in net]
    assert kinds == (["Conv2d", "ClippedMaxMin"] + ["ResidualConv2d", "ClippedMaxMin"] * 3
                     + ["Conv2d", "ClippedMaxMin", "Flatten", "Linear", "ClippedMaxMin", "Linear"])
    assert net[2].channels == 8 and net.spec["depth"] == 3 and net.spec["width"] == 8
    ops, acts = network_layers(net)
    assert [type(op).__name__ for op in ops].count("ResidualConvLayer") == 3
    again = model_from_spec(net.spec)
    again.load_state_dict(net.state_dict())
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(x), net(x))
    default = build_model("liresnet", "maxmin")  # the catalog's depth and width
    assert sum(isinstance(m, ResidualConv2d) for m in default) == 4 and default[2].channels == 16
    with pytest.raises(ValueError, match="residual architectures"):
        build_model("2c2f", depth=2)


def test_model_config_liresnet_composes_and_the_train_stage_builds_it():
    from pathlib import Path

    from locallip.foundation.compose import compose
    from locallip.pipeline.table import stage_config
    from locallip.stages.train import build_for_data

    config = Path(__file__).resolve().parents[2] / "config"
    cfg = compose("smoke", ["model=liresnet", "model.depth=2", "model.width=6"], config_dir=config)
    assert str(cfg.model.arch) == "liresnet" and cfg.model.depth == 2
    net = build_for_data(stage_config(cfg, "train"), {"input_shape": [1, 28, 28], "num_classes": 10})
    assert sum(isinstance(m, ResidualConv2d) for m in net) == 2 and net[2].channels == 6


def test_calibration_finds_the_activations_after_blocks():
    from locallip.nn.models import build_model
    from locallip.stages.calibrate import threshold_layers

    net = build_model("liresnet", "clipped_relu", (1, 28, 28), 10, depth=2, width=4)
    acts = [m for m in net if getattr(m, "has_thresholds", False)]
    assert threshold_layers(net) == acts and len(acts) == 1 + 2 + 1 + 1  # stem, blocks, neck, dense


def test_layer_list_round_trips_a_block_network():
    from locallip.nn.describe import UnsupportedModel, build, describe, load_weights, weights_of
    from locallip.nn.models import build_model

    torch.manual_seed(1)
    net = build_model("liresnet", "clipped_maxmin", (1, 28, 28), 10, depth=2, width=4)
    desc = describe(net, (1, 28, 28))
    assert desc["layers"][2] == {"type": "residual_conv2d", "channels": 4, "kernel_size": 3, "bias": True}
    again = load_weights(build(desc, weights_of(net)), weights_of(net))
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again(x), net(x))
    assert [type(op).__name__ for op in network_layers(again)[0]] == [type(op).__name__ for op in network_layers(net)[0]]
    bad = {**desc, "layers": [*desc["layers"][:2], {"type": "residual_conv2d", "channels": 4, "kernel_size": 2},
                              *desc["layers"][3:]]}
    with pytest.raises(UnsupportedModel, match="layer 2 .*kernel_size must be odd"):
        build(bad)
    wrong = {**desc, "layers": [*desc["layers"][:2], {"type": "residual_conv2d", "channels": 5, "kernel_size": 3},
                                *desc["layers"][3:]]}
    with pytest.raises(UnsupportedModel, match="layer 2 .*does not fit"):
        build(wrong)
