"""``locallip certify-model`` on an ordinary CNN with BatchNorm and average pooling.

The BatchNorm network (described by ``describe``, its running statistics in the weights file) gets
the same certificates, point for point and step for step, as its twin folded by hand and saved as a
plain network; a BatchNorm that cannot be folded is one line naming its layer, and nothing is written.
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from locallip.nn.describe import describe
from locallip.pipeline import cli

pytestmark = pytest.mark.usefixtures("own_rng")
SHAPE = (1, 6, 6)


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 3, (n,), generator=g)
    return (centers[y] + 0.1 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1), y


def _trained_bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(36, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    x, y = _points(256, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):  # training mode: the running statistics move away from (0, 1)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def _hand_folded(net: nn.Sequential) -> nn.Sequential:
    mods = []
    for m in net:
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            layer = mods[-1]
            s = m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)
            with torch.no_grad():
                layer.weight.copy_(layer.weight.double() * s.view(-1, *[1] * (layer.weight.dim() - 1)))
                layer.bias.copy_(s * (layer.bias.double() - m.running_mean.double()) + m.bias.double())
        else:
            mods.append(m)
    return nn.Sequential(*mods)


def _save(net: nn.Sequential, d, name: str):
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(d / f"{name}.safetensors"))
    (d / f"{name}.json").write_text(json.dumps(describe(net, SHAPE)))
    return ["--model", str(d / f"{name}.safetensors"), "--arch", str(d / f"{name}.json")]


def _cli(argv, capsys):
    before = torch.get_num_threads()
    try:
        rc = cli.main(list(argv) + ["--no-progress", "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    return rc, capsys.readouterr().err


def test_a_batchnorm_cnn_certifies_like_its_hand_folded_twin(tmp_path, capsys):
    import copy

    net = _trained_bn_net()
    assert not torch.allclose(net[1].running_var, torch.ones(4))
    x, y = _points()
    np.savez(tmp_path / "points.npz", x=x.numpy(), y=y.numpy())
    twin = _hand_folded(copy.deepcopy(net))
    assert torch.allclose(twin(x), net(x), atol=1e-5)
    radii = ["--radius", "0.05", "--radius", "0.2", "--data", str(tmp_path / "points.npz")]
    tables = {}
    for name, model in (("bn", net), ("twin", twin)):
        rc, err = _cli(["certify-model", *_save(model, tmp_path, name), *radii, "--out", str(tmp_path / name)], capsys)
        assert rc == 0, err
        tables[name] = {r: list(csv.DictReader(open(tmp_path / name / "certify" / f"radius_{r}.csv")))
                        for r in ("0.05", "0.2")}
    steps = set()
    for r in ("0.05", "0.2"):
        ours, theirs = tables["bn"][r], tables["twin"][r]
        assert [(a["certified_local"], a["step_local"]) for a in ours] == \
               [(b["certified_local"], b["step_local"]) for b in theirs]
        assert np.allclose([float(a["worst_margin_local"]) for a in ours],
                           [float(b["worst_margin_local"]) for b in theirs], rtol=1e-5, atol=1e-6)
        steps |= {a["step_local"] for a in ours if a["certified_local"] == "True"}
        summary = json.loads((tmp_path / "bn" / "certify" / f"radius_{r}.json").read_text())
        assert summary["attack"]["broken"] == 0
    assert len(steps) >= 2, steps
    report = (tmp_path / "bn" / "report.md").read_text()
    assert "BatchNorm (layer 1, 6) is folded into the layer before it" in report
    assert "BatchNorm" not in (tmp_path / "twin" / "report.md").read_text()


def test_a_batchnorm_after_an_activation_is_one_line_that_writes_nothing(tmp_path, capsys):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 3)).eval()
    x, y = _points(8)
    np.savez(tmp_path / "points.npz", x=x.numpy(), y=y.numpy())
    out = tmp_path / "out"
    rc, err = _cli(["certify-model", *_save(net, tmp_path, "late"), "--data", str(tmp_path / "points.npz"),
                    "--radius", "0.1", "--out", str(out)], capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "late.json" in err and "layer 2 (BatchNorm2d) does not directly follow a Conv2d" in err, err
    assert not out.exists()
