"""Ranges a dataclass schema cannot say: every numeric field of the configuration is checked.

Values that would make a certificate or its audit meaningless (an infinite or huge
tolerance, a non-positive attack step, delta outside (0, 1), ...) are rejected when
the configuration is composed (``compose.compose``) or received by a job
(``compose.from_plain``), before any work. File-name tags of radii are checked here too.
"""
from __future__ import annotations

import math
import re
from dataclasses import fields, is_dataclass
from typing import Any, Callable, Dict, Sequence

from .radius import check_radius, is_number
from .schema import (CalibrateConfig, CertifyConfig, CertifySettings, CertifyStage, Config, ConfigError, CurveConfig,
                     DatasetConfig, ExternalModel, ModelConfig, RadiiStage, TrainConfig, TrainStage)


_is_number = is_number


def radius_tag(r: float) -> str:
    """File-name tag of a radius: 1.58 -> '1.58', 0.5 -> '0.5', 1 -> '1.0'."""
    return repr(check_radius(r))


def parse_radius_tag(tag: str) -> float:
    """A file-name radius tag back to the radius; only the canonical spelling is accepted."""
    try:
        r = float(tag)
    except ValueError:
        raise ConfigError(f"radius tag {tag!r} is not a number") from None
    if radius_tag(r) != tag:
        raise ConfigError(f"radius tag {tag!r} is not canonical; use {radius_tag(r)!r}")
    return r


def _number(obj: Any, attr: str, where: str, lo: float = -math.inf, hi: float = math.inf, *,
            lo_open: bool = False, hi_open: bool = False, integer: bool = False, optional: bool = False) -> None:
    """Range check of ``obj.attr``: finite, within [lo, hi] (or open ends)."""
    value = getattr(obj, attr)
    if value is None and optional:
        return
    kind = "an integer" if integer else "a finite number"
    ok = _is_number(value) and math.isfinite(value) and (not integer or float(value).is_integer())
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        bounds = []
        if lo > -math.inf:
            bounds.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi < math.inf:
            bounds.append(f"{'<' if hi_open else '<='} {hi:g}")
        rng = f" {' and '.join(bounds)}" if bounds else ""
        raise ConfigError(f"{where}.{attr} must be {kind}{rng}, got {value!r}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _finite_list(values: Sequence[Any], what: str, positive: bool = False) -> None:
    _check(all(_is_number(v) and math.isfinite(v) and (v > 0 or not positive) for v in values),
           f"{what} entries must be finite numbers{' > 0' if positive else ''}, got {list(values)!r}")


def validate_dataset(ds: DatasetConfig) -> None:
    _number(ds, "seed", "dataset", 0, integer=True)
    for k in ("val_size", "calib_size", "test_size"):
        _number(ds, k, "dataset", 1, integer=True)
    for k in ("train_limit", "test_limit"):
        _number(ds, k, "dataset", 1, integer=True, optional=True)
    _normalization(ds.mean, ds.std, "dataset")


def _normalization(mean: Sequence[float], std: Sequence[float], where: str) -> None:
    _check(len(mean) == len(std), f"{where}.mean and {where}.std must have the same length")
    _finite_list(mean, f"{where}.mean")
    _finite_list(std, f"{where}.std", positive=True)


def validate_model(m: ModelConfig) -> None:
    _number(m, "theta_init", "model", 0)
    for k in ("depth", "width"):
        _number(m, k, "model", 1, integer=True, optional=True)


def validate_train(t: TrainConfig) -> None:
    for k in ("eps", "eps_train", "weight_decay", "sparsity_weight", "trades_lambda"):
        _number(t, k, "train", 0)
    _number(t, "lr", "train", 0, lo_open=True)
    _number(t, "kappa_end", "train", 0, 1)
    _number(t, "adaptive_tol", "train", 0, 1, lo_open=True, hi_open=True)
    _number(t, "lr_decay", "train", 0, 1, lo_open=True)
    for k in ("epochs", "batch_size", "power_iters", "solver_steps", "val_every", "val_max_iter"):
        _number(t, k, "train", 1, integer=True)
    for k in ("warmup_epochs", "ramp_epochs", "lr_decay_start", "seed", "diagnostics_size"):
        _number(t, k, "train", 0, integer=True)


def validate_calibrate(c: CalibrateConfig) -> None:
    _number(c, "eps", "calibrate", 0)
    _check(len(c.scales) > 0, "calibrate.scales must not be empty")
    _finite_list(c.scales, "calibrate.scales", positive=True)
    _number(c, "max_clean_drop", "calibrate", 0, 1)
    _number(c, "max_iter", "calibrate", 1, integer=True)
    _number(c, "tol", "calibrate", 0, 0.1, lo_open=True)
    _number(c, "batch_size", "calibrate", 1, integer=True)


def validate_certify(c: CertifySettings) -> None:
    """Values that would make a certificate or its audit meaningless are rejected here."""
    _number(c, "delta", "certify", 0, 1, lo_open=True, hi_open=True)
    _number(c, "inflation", "certify", 0, 1, lo_open=True)
    _number(c, "steps", "certify", 1, integer=True, optional=True)
    _number(c, "screen_steps", "certify", 1, integer=True)
    _number(c, "max_iter", "certify", 1, integer=True)
    # A loose tolerance makes an estimate meaningless (and places the exact level's trials badly).
    _number(c, "tol", "certify", 0, 0.01, lo_open=True)
    _number(c, "batch_size", "certify", 1, integer=True)
    _number(c, "seed", "certify", 0, integer=True)
    _number(c.attack, "steps", "certify.attack", 1, integer=True)
    _number(c.attack, "restarts", "certify.attack", 1, integer=True)
    _number(c.attack, "step_size", "certify.attack", 0, 2, lo_open=True)
    _number(c.attack, "patience", "certify.attack", 1, integer=True)
    _number(c.attack, "budget", "certify.attack", 0, lo_open=True, optional=True)
    if isinstance(c, CertifyConfig):
        _check(len(c.radii) > 0, "certify.radii must not be empty")
        for r in c.radii:
            check_radius(r, "every certify.radii entry")
        _check(len(set(map(float, c.radii))) == len(c.radii), "certify.radii has duplicates")


def validate_curve(c: CurveConfig, where: str = "curve") -> None:
    _number(c, "max_radius", where, 0, lo_open=True, optional=True)
    _number(c, "tol", where, 0, 1, lo_open=True, hi_open=True)
    _number(c, "batch_size", where, 1, integer=True)


#: An experiment's name is a directory under results/: letters, digits, '_' and '-', no path.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def check_name(name: Any, what: str = "name") -> str:
    """An experiment name that stays a single directory under results/ (no '/', '..' or empty name)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{what} must be letters, digits, '_' or '-' (it names results/<name>/), got {name!r}")
    return name


def validate(cfg: Config) -> Config:
    """Ranges that a dataclass schema cannot express; every numeric field is checked."""
    check_name(cfg.name)
    for b in cfg.report.baselines:
        check_name(b, "every report.baselines entry")
    check_radius(cfg.eps, "eps")
    validate_dataset(cfg.dataset)
    validate_model(cfg.model)
    validate_train(cfg.train)
    validate_calibrate(cfg.calibrate)
    validate_certify(cfg.certify)
    validate_curve(cfg.curve)
    _number(cfg.run, "threads", "run", 0, integer=True)
    _number(cfg.run, "processes", "run", 1, integer=True)
    for i, p in enumerate(cfg.report.paper):
        check_radius(p.eps, f"report.paper[{i}].eps")
    return cfg


def _radii_stage(obj: RadiiStage) -> None:
    _number(obj, "max_radius", "radii", 0, lo_open=True)
    _number(obj, "tol", "radii", 0, 1, lo_open=True, hi_open=True)
    _number(obj, "batch_size", "radii", 1, integer=True)


def _train_stage(obj: TrainStage) -> None:
    _normalization(obj.normalization.mean, obj.normalization.std, "normalization")


def _external(obj) -> None:
    check_name(obj.name)
    _check(len(obj.radii) > 0, "radii must not be empty")
    for r in obj.radii:
        check_radius(r, "every radii entry")
    _number(obj, "limit", "certify-model", 1, integer=True, optional=True)
    _normalization(obj.normalization.mean, obj.normalization.std, "normalization")


#: The range check of each part of a stage's configuration; ``validate_stage`` walks the parts.
CHECKS: Dict[type, Callable[[Any], None]] = {
    DatasetConfig: validate_dataset, ModelConfig: validate_model, TrainConfig: validate_train,
    CalibrateConfig: validate_calibrate, CertifySettings: validate_certify, CertifyConfig: validate_certify,
    CurveConfig: validate_curve, TrainStage: _train_stage, RadiiStage: _radii_stage,
    CertifyStage: lambda obj: check_radius(obj.radius), ExternalModel: _external,
}


def validate_stage(obj: Any) -> None:
    """The ranges of a stage's configuration: every part of it with a check in ``CHECKS``."""
    if isinstance(obj, Config):
        validate(obj)
        return
    if is_dataclass(obj) and isinstance(getattr(obj, "name", None), str):
        check_name(obj.name)
    if type(obj) in CHECKS:
        CHECKS[type(obj)](obj)
    if is_dataclass(obj):
        for f in fields(obj):
            validate_stage(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            validate_stage(v)
