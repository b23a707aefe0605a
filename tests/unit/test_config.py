"""Typed configuration: composition, enums, interpolation, validation of every numeric field,
stage parts (what each job tracks) and the plain-value round trip jobs receive."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from locallip.foundation.compose import compose, experiment_names, from_plain, plain
from locallip.foundation.schema import Arch, Bound, ConfigError, DatasetName, Guarantee
from locallip.pipeline.table import NAMES as STAGES
from locallip.pipeline.table import stage, stage_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"


def _compose(name="smoke", overrides=()):
    return compose(name, list(overrides), config_dir=CONFIG)


def test_every_experiment_composes_to_typed_values():
    for name in experiment_names(CONFIG):
        cfg = _compose(name)
        assert cfg.name == name
        assert isinstance(cfg.dataset.name, DatasetName) and isinstance(cfg.model.arch, Arch)
        assert isinstance(cfg.train.bound, Bound) and isinstance(cfg.certify.guarantee, Guarantee)
        assert cfg.train.eps == cfg.eps and cfg.calibrate.eps == cfg.eps  # one target radius, interpolated
        json.dumps(plain(cfg))  # plain values only


def test_cifar_radius_is_written_once():
    text = (CONFIG / "experiment" / "cifar10.yaml").read_text()
    assert text.count("0.1411") == 0 and "${div:36,255}" in text
    cfg = _compose("cifar10")
    assert cfg.eps == pytest.approx(36 / 255) and cfg.train.eps_train == pytest.approx(1.1 * 36 / 255)
    assert cfg.certify.radii == pytest.approx([0.0, 36 / 255, 72 / 255, 108 / 255])
    assert cfg.report.paper[0].eps == pytest.approx(36 / 255)


@pytest.mark.parametrize("override, message", [
    ("+train.epochz=3", "epochz"),  # unknown key, even when added with +
    ("train.epochz=3", "epochz"),
    ("train.epochs=many", "could not be converted to Integer"),  # the reason, not just "error merging"
    ("model.arch=9c9f", "expected one of [2c2f, 4c3f, 6c2f, 8c2f, liresnet]"),
    ("train.bound=glob", "expected one of [local, global]"),
    ("certify.guarantee=likely", "expected one of [probabilistic, exact, estimate]"),
])
def test_bad_values_fail_at_composition_naming_the_problem(override, message):
    with pytest.raises(ConfigError) as e:
        _compose("smoke", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


# Values that would make a certificate or its audit meaningless, and other out-of-range numbers.
BAD = [
    "certify.tol=inf", "certify.tol=1e9", "certify.tol=0", "certify.tol=-1", "certify.max_iter=0",
    "certify.attack.step_size=-1", "certify.attack.step_size=0", "certify.attack.step_size=nan",
    "certify.attack.steps=0", "certify.attack.restarts=0", "certify.attack.patience=0", "certify.batch_size=0",
    "certify.delta=0",
    "certify.delta=1", "certify.inflation=0", "certify.steps=0", "certify.seed=-1", "certify.radii=[]",
    "certify.radii=[0.1,0.1]", "certify.radii=[-0.1]", "curve.tol=0", "curve.max_radius=0", "curve.batch_size=0",
    "train.val_every=0", "train.batch_size=0", "train.epochs=0", "train.lr=0", "train.lr=inf",
    "train.lr_decay=0", "train.kappa_end=2", "train.solver_steps=0", "train.power_iters=0",
    "train.diagnostics_size=-1", "train.eps_train=-0.1", "train.val_max_iter=0",
    "calibrate.tol=inf", "calibrate.batch_size=0", "calibrate.max_clean_drop=1.5", "calibrate.scales=[]",
    "calibrate.scales=[0,1]", "dataset.val_size=0", "dataset.seed=-1", "dataset.train_limit=0",
    "model.theta_init=-1", "model.depth=0", "model.width=0", "eps=-0.3", "run.threads=-1",
]


@pytest.mark.parametrize("override", BAD)
def test_every_numeric_field_is_range_checked(override):
    with pytest.raises(ConfigError):
        _compose("smoke", [override])


def test_weakened_power_iteration_is_rejected():
    with pytest.raises(ConfigError, match="certify.tol"):
        _compose("smoke", ["certify.method=power", "certify.tol=1e9", "certify.max_iter=1"])


@pytest.mark.parametrize("stage_name", STAGES)
def test_stage_parts_round_trip_and_validate(stage_name):
    cfg = _compose("mnist5k")
    part = stage_config(cfg, stage_name, 0.3 if stage_name == "certify" else None)
    assert isinstance(part, stage(stage_name).config)
    again = from_plain(stage(stage_name).config, json.loads(json.dumps(plain(part))))
    assert plain(again) == plain(part)


def test_from_plain_refuses_bad_stage_values():
    good = plain(stage_config(_compose("smoke"), "certify", 0.1))
    bad = json.loads(json.dumps(good))
    bad["certify"]["tol"] = float("inf")
    with pytest.raises(ConfigError, match="certify.tol"):
        from_plain(stage("certify").config, bad)
    bad = json.loads(json.dumps(good))
    bad["certify"]["tolerance"] = 1e-4
    with pytest.raises(ConfigError, match="tolerance"):
        from_plain(stage("certify").config, bad)


def test_cosmetic_settings_are_in_no_stage_part():
    a, b = _compose("smoke"), _compose("smoke", ["run.progress=true", "run.threads=7"])
    assert b.run.threads == 7
    for name in STAGES:
        assert plain(stage_config(a, name, 0.1)) == plain(stage_config(b, name, 0.1)), name


def test_a_new_radius_changes_no_certify_part():
    a, b = _compose("smoke"), _compose("smoke", ["certify.radii=[0.1,0.3,0.45]"])
    assert plain(stage_config(a, "certify", 0.1)) == plain(stage_config(b, "certify", 0.1))
    assert plain(stage_config(a, "train")) == plain(stage_config(b, "train"))


def test_enums_behave_as_strings():
    cfg = _compose("smoke")
    assert cfg.train.bound == "local" and f"{cfg.model.arch}" == "2c2f" and str(cfg.dataset.name) == "mnist5k"
    assert Bound["global"].value == "global"
    assert dataclasses.replace(cfg.train, bound=Bound["global"]).bound == "global"
