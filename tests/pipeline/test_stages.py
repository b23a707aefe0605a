"""The train / calibrate / certify stages, called as library functions and through the CLI.

They work on the session's one smoke run (``pipeline_helpers.smoke_project``: the smoke
experiment trained once, by Snakemake), copied into a scratch directory.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from locallip.certify import certify
from locallip.data.splits import load_splits, save_splits, to_tensors
from locallip.pipeline import cli
from locallip.foundation.checkpoints import CheckpointError
from locallip.nn.checkpoint import load_model, save_model
from locallip.foundation.compose import compose, plain
from locallip.foundation.schema import RunConfig
from locallip.pipeline.table import stage_config
from locallip.stages.calibrate import run_calibrate, threshold_layers
from locallip.stages.certify import run_certify
from locallip.stages.train import run_train

from pipeline_helpers import SMALL_DATA_OVERRIDES, SMOKE, small_splits, smoke_cfg, smoke_project

REPO = Path(__file__).resolve().parents[2]
QUIET = RunConfig(progress=False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke experiment's splits, trained model and metrics (from the session's smoke run)."""
    src = smoke_project(tmp_path_factory) / "results" / SMOKE
    d = tmp_path_factory.mktemp("smoke-stages")
    shutil.copy(src / "data" / "splits.npz", d / "splits.npz")
    shutil.copy(src / "train" / "model.pt", d / "model.pt")
    shutil.copy(src / "train" / "metrics.json", d / "metrics.json")
    summary = json.loads((d / "metrics.json").read_text())
    return {"dir": d, "cfg": smoke_cfg(), "summary": summary}


def _weights(path):
    model, _ = load_model(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_learns_and_picks_best_by_validation(smoke):
    s = smoke["summary"]
    metrics = json.loads((smoke["dir"] / "metrics.json").read_text())
    assert metrics["best_epoch"] == s["best_epoch"]
    scored = [e for e in metrics["epochs"] if e["val_certified_acc"] is not None]
    assert scored, "no epoch was evaluated on the validation split"
    best = max(scored, key=lambda e: (e["val_certified_acc"], e["val_clean_acc"], e["epoch"]))
    assert s["best_epoch"] == best["epoch"]
    assert best["val_clean_acc"] > 0.5  # far above chance (0.1): the model learned something
    _, ck = load_model(smoke["dir"] / "model.pt")
    assert ck["epoch"] == s["best_epoch"] and ck["train"]["bound"] == "local"
    # per epoch: fixed neurons per layer and the training / converged bound ratio (diagnostics)
    last = metrics["epochs"][-1]
    assert len(last["fixed_per_layer"]) == 3 and len(last["bound_ratio_layers_median"]) == 3
    assert 0.5 < last["bound_ratio_median"] <= 1.0 + 1e-6


def test_resume_after_kill_matches_uninterrupted_run(smoke, tmp_path, monkeypatch):
    import locallip.stages.train as train_mod

    cfg = stage_config(smoke_cfg(SMOKE, SMALL_DATA_OVERRIDES), "train")
    data = small_splits(tmp_path / "splits.npz")
    ref = tmp_path / "uninterrupted"  # same process, same threads: comparable bit for bit
    run_train(cfg, data=data, out=ref / "model.pt", metrics=ref / "m.json", state=ref / "state" / "last.pt", run=QUIET)
    calls = {"n": 0}
    real = train_mod.evaluate

    def killed_after_first_validation(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 3's validation: epochs 1-2 are checkpointed
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", killed_after_first_validation)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, data=data, out=tmp_path / "model.pt", metrics=tmp_path / "m.json",
                  state=tmp_path / "state" / "last.pt", run=QUIET)
    assert not (tmp_path / "model.pt").exists()
    state = torch.load(tmp_path / "state" / "last.pt", weights_only=True)
    assert state["epoch"] == 1  # 0-based: two epochs done
    monkeypatch.setattr(train_mod, "evaluate", real)
    resumed = run_train(cfg, data=data, out=tmp_path / "model.pt", metrics=tmp_path / "m.json",
                        state=tmp_path / "state" / "last.pt", run=QUIET)
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    a, b = _weights(tmp_path / "model.pt"), _weights(ref / "model.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs from the uninterrupted one in {k}"


def test_checkpoints_load_without_running_pickled_code(smoke, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": "locallip-checkpoint-1", "spec": {}, "state_dict": {}, "x": Evil()}, bad)
    with pytest.raises(CheckpointError):
        load_model(bad)
    assert not marker.exists()

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((smoke["dir"] / "model.pt").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_model(corrupt)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.pt")

    model, ck = load_model(smoke["dir"] / "model.pt")
    sd = model.state_dict()
    sd[next(k for k in sd if k.endswith("weight"))] = torch.zeros(3)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "locallip-checkpoint-1", "spec": ck["spec"], "state_dict": sd}, wrong)
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(wrong)


def _certify_cfg(smoke, radius, **attack):
    cfg = stage_config(smoke["cfg"], "certify", radius)
    if attack:
        cfg = dataclasses.replace(cfg, certify=dataclasses.replace(
            cfg.certify, attack=dataclasses.replace(cfg.certify.attack, **attack)))
    return cfg


def test_certify_stage_outputs_and_strong_attack_breaks_nothing(smoke, tmp_path):
    # Acceptance: a model trained for a few epochs on mnist5k; l2 PGD with 50 steps and
    # 5 restarts at eps breaks none of the certified test points.
    radius = smoke["cfg"].train.eps
    s = run_certify(_certify_cfg(smoke, radius, steps=50, restarts=5), data=smoke["dir"] / "splits.npz",
                    model=smoke["dir"] / "model.pt", out=tmp_path / "c.json", table=tmp_path / "c.csv", run=QUIET)
    assert s["attack"]["steps"] == 50 and s["attack"]["restarts"] == 5
    assert s["attack"]["checked"] > 10, "too few certified points for the audit to mean anything"
    assert s["attack"]["broken"] == 0
    assert s["certified_acc_local"] >= s["certified_acc_global"]
    assert 0 < s["median_bound_ratio"] <= 1.0
    rows = list(csv.DictReader(open(tmp_path / "c.csv")))
    assert len(rows) == s["n"] == 100
    n_local = sum(r["certified_local"] == "True" for r in rows)
    assert n_local == round(s["certified_acc_local"] * s["n"])
    for r in rows:  # certified means correct and a strictly positive margin lower bound
        if r["certified_local"] == "True":
            assert r["label"] == r["prediction"] and float(r["worst_margin_local"]) > 0
            assert float(r["attack_margin"]) > 0
        if r["certified_global"] == "True":
            assert r["certified_local"] == "True"
    assert json.loads((tmp_path / "c.json").read_text()) == s


def test_calibration_uses_only_the_calibration_split(smoke, tmp_path):
    cfg = stage_config(smoke["cfg"], "calibrate")
    data = smoke["dir"] / "splits.npz"
    first = run_calibrate(cfg, data=data, model=smoke["dir"] / "model.pt", out=tmp_path / "a.pt",
                          summary=tmp_path / "a.json")
    assert first["applicable"] and first["chosen_scales"]
    assert all(s in cfg.calibrate.scales + [1.0] for s in first["chosen_scales"])
    assert first["after"]["certified_acc"] >= first["before"]["certified_acc"]
    assert first["after"]["clean_acc"] >= first["before"]["clean_acc"] - cfg.calibrate.max_clean_drop
    # Scrambling the test split changes nothing: calibration never looks at it.
    splits = load_splits(data)
    splits.test_x = np.random.default_rng(1).integers(0, 256, splits.test_x.shape, dtype=np.uint8)
    save_splits(splits, tmp_path / "scrambled.npz")
    second = run_calibrate(cfg, data=tmp_path / "scrambled.npz", model=smoke["dir"] / "model.pt",
                           out=tmp_path / "b.pt", summary=tmp_path / "b.json")
    assert second["tried"] == first["tried"] and second["chosen_scales"] == first["chosen_scales"]
    # The calibrated thresholds are the trained ones times the chosen scales.
    base, _ = load_model(smoke["dir"] / "model.pt")
    cal, _ = load_model(tmp_path / "a.pt")
    for lb, lc, s in zip(threshold_layers(base), threshold_layers(cal), first["chosen_scales"]):
        assert torch.allclose(lc.theta, lb.theta * s)


def test_calibration_passes_models_without_thresholds_through(smoke, tmp_path):
    model, ck = load_model(smoke["dir"] / "model.pt")
    from locallip.nn.models import build_model
    relu = build_model("2c2f", "relu", (1, 28, 28), 10)
    save_model(tmp_path / "relu.pt", relu, train={"bound": "global"})
    res = run_calibrate(stage_config(smoke["cfg"], "calibrate"), data=smoke["dir"] / "splits.npz",
                        model=tmp_path / "relu.pt", out=tmp_path / "out.pt", summary=tmp_path / "s.json")
    assert not res["applicable"] and "unchanged" in res["message"]
    a, b = _weights(tmp_path / "relu.pt"), _weights(tmp_path / "out.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gloro_training_path(smoke, tmp_path):
    cfg = stage_config(compose("smoke_gloro", ["train.epochs=2", "train.ramp_epochs=1"],
                               config_dir=REPO / "config"), "train")
    s = run_train(cfg, data=smoke["dir"] / "splits.npz", out=tmp_path / "g.pt", metrics=tmp_path / "g.json",
                  state=tmp_path / "state" / "last.pt", run=QUIET)
    assert s["bound"] == "global" and s["loss"] == "gloro"
    assert s["epochs"][-1]["val_clean_acc"] > 0.3
    model, _ = load_model(tmp_path / "g.pt")
    x, y = to_tensors(*[getattr(load_splits(smoke["dir"] / "splits.npz"), k)[:50] for k in ("val_x", "val_y")])
    c_local = certify(model.double(), x.double(), y, 0.1, "local")
    c_global = certify(model.double(), x.double(), y, 0.1, "global")
    assert bool((c_local.certified | ~c_global.certified).all())


# ----------------------------------------------------------------------------- CLI errors


def _run_cli(args, capsys):
    rc = cli.main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["download", "experiment=smoke", "dataset.name=cifar100"], "'cifar100', expected one of"),
    (["train", "experiment=smoke", "train.epochz=3"], "epochz"),
    (["train", "experiment=smoke", "train.epochs=many"], "train.epochs"),
    (["config", "experiment=nosuch"], "unknown experiment 'nosuch'"),
])
def test_cli_bad_config_fails_naming_the_problem(args, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc, err = _run_cli(args, capsys)
    assert rc == 2 and message in err


@pytest.mark.parametrize("radius", ["-0.5", "abc", "nan", "inf"])
def test_cli_bad_radius_fails(radius, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        cli.main(["certify", "experiment=smoke", "--radius", radius])
    assert e.value.code == 2
    assert "radius" in capsys.readouterr().err


def test_cli_missing_or_corrupt_checkpoint_keeps_existing_outputs(smoke, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out, table = tmp_path / "c.json", tmp_path / "c.csv"
    out.write_text('{"good": true}\n')
    table.write_text("good\n")
    cfg = json.dumps(plain(_certify_cfg(smoke, 0.1)))
    rc, err = _run_cli(["certify", "--cfg-json", cfg, "--data", str(smoke["dir"] / "splits.npz"),
                        "--model", str(tmp_path / "nope.pt"), "--out", str(out), "--table", str(table)], capsys)
    assert rc == 2 and "nope.pt" in err and "not found" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    rc, err = _run_cli(["certify", "--cfg-json", cfg, "--data", str(smoke["dir"] / "splits.npz"),
                        "--model", str(corrupt), "--out", str(out), "--table", str(table)], capsys)
    assert rc == 2 and "corrupt.pt" in err
    assert out.read_text() == '{"good": true}\n' and table.read_text() == "good\n"


def test_cli_wrong_input_shape_is_reported(smoke, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from locallip.nn.models import build_model
    save_model(tmp_path / "cifar.pt", build_model("2c2f", "relu", (3, 32, 32), 10))
    rc, err = _run_cli(["certify", "--cfg-json", json.dumps(plain(_certify_cfg(smoke, 0.1))),
                        "--data", str(smoke["dir"] / "splits.npz"), "--model", str(tmp_path / "cifar.pt"),
                        "--out", str(tmp_path / "c.json"), "--table", str(tmp_path / "c.csv")], capsys)
    assert rc == 2 and "(1, 28, 28)" in err and not (tmp_path / "c.json").exists()


def test_a_broken_certificate_fails_the_stage_loudly(smoke, tmp_path, capsys, monkeypatch):
    """If the audit attack ever breaks a certified point, certify exits non-zero and writes no result."""
    import locallip.certify.split as certify_split
    import locallip.stages.certify as certify_stage

    def always_breaks(model, x, y, eps, *args, **kw):
        return torch.full((x.shape[0],), -1.0, dtype=x.dtype)

    monkeypatch.setattr(certify_split, "audit_l2", always_breaks)
    monkeypatch.chdir(REPO)
    out = tmp_path / "c.json"
    rc, err = _run_cli(["certify", "--cfg-json", json.dumps(plain(_certify_cfg(smoke, 0.1))),
                        "--data", str(smoke["dir"] / "splits.npz"), "--model", str(smoke["dir"] / "model.pt"),
                        "--out", str(out), "--table", str(tmp_path / "c.csv")], capsys)
    assert rc == 3 and "AUDIT FAILED" in err
    assert not out.exists() and not (tmp_path / "c.csv").exists()
    details = json.loads((tmp_path / "c.json.audit-failed.json").read_text())
    assert details["summary"]["attack"]["broken"] == len(details["broken"]) > 0
