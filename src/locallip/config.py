"""Structured configuration (Hydra + OmegaConf dataclasses).

Every group under ``config/`` (dataset, model, train, calibrate, certify,
experiment) is validated against the dataclasses below, so an unknown key or a
wrongly typed value fails at composition time, before any job runs.

``compose(experiment, overrides)`` is the one place configuration is built;
stages receive the result as a plain ``dict`` (``to_plain``) so orchestrators
can track it as ordinary parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import MISSING, OmegaConf

DATASET_NAMES = ("mnist5k", "mnist", "fashion_mnist", "cifar10", "tinyimagenet")
ARCHS = ("2c2f", "4c3f", "6c2f", "8c2f")
ACTIVATIONS = ("relu", "clipped_relu", "maxmin", "clipped_maxmin")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class DatasetConfig:
    name: str = "mnist5k"
    root: str = "data/raw"  # download cache (torchvision layout)
    source: Optional[str] = None  # local directory or archive to import from (offline)
    download: bool = True  # allow network downloads when the data is not in `root`
    seed: int = 0
    val_size: int = 500  # held out from training data: early stopping / checkpoint choice
    calib_size: int = 500  # held out from training data: threshold calibration
    test_size: int = 500  # only used when the dataset has no official test split
    train_limit: Optional[int] = None  # cap on training examples (smoke runs)
    test_limit: Optional[int] = None  # cap on test examples (smoke runs)
    mean: List[float] = field(default_factory=list)  # per-channel normalization, folded into layer 1
    std: List[float] = field(default_factory=list)


@dataclass
class ModelConfig:
    arch: str = "4c3f"
    activation: str = "clipped_relu"
    theta_init: float = 1.0  # initial clipping threshold of clipped activations


@dataclass
class TrainConfig:
    bound: str = "local"  # local | global
    loss: str = "bcp_mix"  # bcp_mix | gloro | gloro_trades
    last_layer: str = "ball_box"  # ball | ball_box  (local bound only)
    eps: float = 1.58  # target certification radius
    eps_train: float = 1.74  # training radius (slightly above eps)
    epochs: int = 10
    warmup_epochs: int = 0  # clean training only
    ramp_epochs: int = 5  # eps 0 -> eps_train and kappa 1 -> 0
    ramp: str = "linear"  # linear | log
    kappa_end: float = 0.0
    trades_lambda: float = 1.5
    batch_size: int = 128
    lr: float = 1e-3
    lr_decay_start: int = 0  # epoch from which the LR decays exponentially (0 = at ramp end)
    lr_decay: float = 0.9  # per-epoch factor after lr_decay_start
    weight_decay: float = 0.0
    sparsity_weight: float = 0.0  # clipped activations only
    power_iters: int = 2  # power iterations per step (warm-started): global bound, and local_solver=power
    local_solver: str = "krylov"  # krylov (Lanczos, local_steps steps) | power (power_iters iterations)
    local_steps: int = 8  # Lanczos steps per layer and step for the local bound (warm-started)
    diagnostics_size: int = 256  # validation points for the per-epoch bound diagnostics (0 = off)
    augment: bool = False  # random crop + flip (CIFAR / Tiny-ImageNet)
    val_every: int = 1
    val_max_iter: int = 100  # power iterations (tol 1e-3) when certifying the validation split
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # 0 = torch default
    seed: int = 0
    progress: bool = True


@dataclass
class CalibrateConfig:
    eps: float = 1.58  # radius whose certified accuracy is maximised
    scales: List[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 2.0])
    max_clean_drop: float = 0.02  # largest clean-accuracy loss accepted (fraction)
    per_layer: bool = True  # after the best uniform scale, one coordinate pass over the layers
    max_iter: int = 100  # candidates are only compared: a looser tolerance than certification
    tol: float = 1e-3
    batch_size: int = 256


@dataclass
class AttackConfig:
    steps: int = 50
    restarts: int = 5
    step_size: float = 0.1  # fraction of the radius per step


@dataclass
class CertifyConfig:
    radii: List[float] = field(default_factory=lambda: [0.5, 1.0, 1.58])
    # What a local-bound certificate promises: probabilistic (P(false) <= delta per point),
    # exact (deterministic), or estimate (converged from below, not a guarantee).
    guarantee: str = "probabilistic"
    extra_guarantees: List[str] = field(default_factory=list)  # further levels reported beside it
    delta: float = 1.0e-9  # probabilistic: failure probability per certified point (union over layers)
    inflation: float = 0.01  # probabilistic: Lanczos steps chosen so the norm inflation is at most this
    steps: Optional[int] = None  # probabilistic: Lanczos steps per layer (null: from inflation)
    method: str = "lanczos"  # estimate: lanczos | power (how the masked layer norms are estimated)
    max_iter: int = 2000  # estimate/exact: operator applications per layer
    tol: float = 1e-4  # estimate/exact: relative residual of the top Ritz pair (lanczos) or Rayleigh quotient (power)
    batch_size: int = 256
    dtype: str = "float64"  # float64 keeps rounding error far below the margins
    last_layer: str = "ball_box"
    seed: int = 0  # random start of the power iteration
    attack: AttackConfig = field(default_factory=AttackConfig)


@dataclass
class PaperRow:
    setting: str = MISSING
    system: str = MISSING
    eps: float = MISSING
    clean: Optional[float] = None
    certified: Optional[float] = None
    source: str = ""


@dataclass
class ReportConfig:
    baseline: Optional[str] = None  # experiment shown side by side (e.g. the GloRo baseline)
    paper: List[PaperRow] = field(default_factory=list)


@dataclass
class Config:
    name: str = "mnist5k"
    description: str = ""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


def default_config_dir() -> Path:
    """`config/` of the repository (the working directory first, then the source tree)."""
    here = Path.cwd() / "config"
    if (here / "config.yaml").exists():
        return here
    return Path(__file__).resolve().parents[2] / "config"


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(group="dataset", name="schema", node=DatasetConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="train", name="schema", node=TrainConfig)
    cs.store(group="calibrate", name="schema", node=CalibrateConfig)
    cs.store(group="certify", name="schema", node=CertifyConfig)


def experiment_names(config_dir: Optional[Path] = None) -> List[str]:
    d = Path(config_dir or default_config_dir()) / "experiment"
    return sorted(p.stem for p in d.glob("*.yaml"))


def compose(experiment: Optional[str] = None, overrides: Optional[List[str]] = None,
            config_dir: Optional[Path] = None) -> dict:
    """Compose, validate and resolve the configuration of one experiment.

    Returns a plain dict. Raises ConfigError naming the problem.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir or default_config_dir()).resolve()
    if not (config_dir / "config.yaml").exists():
        raise ConfigError(f"no config.yaml in config directory {config_dir}")
    overrides = list(overrides or [])
    if experiment is not None:
        known = experiment_names(config_dir)
        if experiment not in known:
            raise ConfigError(f"unknown experiment {experiment!r}; known: {', '.join(known)}")
        overrides = [f"experiment={experiment}"] + overrides
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"invalid configuration: {e}") from e
    finally:
        GlobalHydra.instance().clear()
    plain.pop("experiment", None)
    validate(plain)
    return plain


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_nonneg(value: Any, name: str) -> None:
    _check(_is_number(value) and math.isfinite(value) and value >= 0,
           f"{name} must be a finite number >= 0, got {value!r}")


def _number(cfg: dict, key: str, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
            hi_open: bool = False, integer: bool = False, optional: bool = False) -> None:
    """Range check of the number at dotted ``key``: finite, within [lo, hi] (or open ends)."""
    value: Any = cfg
    for part in key.split("."):
        value = value[part]
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
        raise ConfigError(f"{key} must be {kind}{rng}, got {value!r}")


def _choice(cfg: dict, key: str, choices: Sequence[str]) -> None:
    value: Any = cfg
    for part in key.split("."):
        value = value[part]
    _check(value in choices, f"{key} must be one of {', '.join(choices)}, got {value!r}")


GUARANTEES = ("probabilistic", "exact", "estimate")


def validate(cfg: dict) -> dict:
    """Choices and ranges that a dataclass schema cannot express; every numeric field is checked.

    Values that would make a certificate or its audit meaningless (an infinite or huge
    tolerance, a non-positive attack step, delta outside (0, 1), ...) are rejected here,
    when the configuration is composed, before any job runs.
    """
    ds, m, t, c, cal = cfg["dataset"], cfg["model"], cfg["train"], cfg["certify"], cfg["calibrate"]
    _choice(cfg, "dataset.name", DATASET_NAMES)
    _number(cfg, "dataset.seed", 0, integer=True)
    for k in ("val_size", "calib_size", "test_size"):
        _number(cfg, f"dataset.{k}", 1, integer=True)
    for k in ("train_limit", "test_limit"):
        _number(cfg, f"dataset.{k}", 1, integer=True, optional=True)
    _check(len(ds["mean"]) == len(ds["std"]), "dataset.mean and dataset.std must have the same length")
    _check(all(_is_number(v) and math.isfinite(v) for v in ds["mean"]), "dataset.mean entries must be finite numbers")
    _check(all(_is_number(v) and math.isfinite(v) and v > 0 for v in ds["std"]),
           "dataset.std entries must be finite numbers > 0")

    _choice(cfg, "model.arch", ARCHS)
    _choice(cfg, "model.activation", ACTIVATIONS)
    _number(cfg, "model.theta_init", 0)

    _choice(cfg, "train.bound", ("local", "global"))
    _choice(cfg, "train.loss", ("bcp_mix", "gloro", "gloro_trades"))
    _choice(cfg, "train.last_layer", ("ball", "ball_box"))
    _choice(cfg, "train.ramp", ("linear", "log"))
    _choice(cfg, "train.device", ("auto", "cpu", "cuda"))
    _choice(cfg, "train.local_solver", ("krylov", "power"))
    for k in ("eps", "eps_train", "weight_decay", "sparsity_weight", "trades_lambda"):
        _number(cfg, f"train.{k}", 0)
    _number(cfg, "train.lr", 0, lo_open=True)
    _number(cfg, "train.kappa_end", 0, 1)
    _number(cfg, "train.lr_decay", 0, 1, lo_open=True)
    for k in ("epochs", "batch_size", "power_iters", "local_steps", "val_every", "val_max_iter"):
        _number(cfg, f"train.{k}", 1, integer=True)
    for k in ("warmup_epochs", "ramp_epochs", "lr_decay_start", "num_threads", "seed", "diagnostics_size"):
        _number(cfg, f"train.{k}", 0, integer=True)

    _number(cfg, "calibrate.eps", 0)
    _check(len(cal["scales"]) > 0 and all(_is_number(v) and math.isfinite(v) and v > 0 for v in cal["scales"]),
           "calibrate.scales must be a non-empty list of finite numbers > 0")
    _number(cfg, "calibrate.max_clean_drop", 0, 1)
    _number(cfg, "calibrate.max_iter", 1, integer=True)
    _number(cfg, "calibrate.tol", 0, 0.1, lo_open=True)
    _number(cfg, "calibrate.batch_size", 1, integer=True)

    _check(len(c["radii"]) > 0, "certify.radii must not be empty")
    for r in c["radii"]:
        _finite_nonneg(r, "every certify.radii entry")
    _check(len(set(map(float, c["radii"]))) == len(c["radii"]), "certify.radii has duplicates")
    _choice(cfg, "certify.guarantee", GUARANTEES)
    _check(all(lv in GUARANTEES for lv in c["extra_guarantees"]),
           f"certify.extra_guarantees entries must be among {', '.join(GUARANTEES)}, got {c['extra_guarantees']!r}")
    _number(cfg, "certify.delta", 0, 1, lo_open=True, hi_open=True)
    _number(cfg, "certify.inflation", 0, 1, lo_open=True)
    _number(cfg, "certify.steps", 1, integer=True, optional=True)
    _choice(cfg, "certify.method", ("lanczos", "power"))
    _number(cfg, "certify.max_iter", 1, integer=True)
    # A loose tolerance makes an estimate meaningless (and places the exact level's trials badly).
    _number(cfg, "certify.tol", 0, 0.01, lo_open=True)
    _number(cfg, "certify.batch_size", 1, integer=True)
    _choice(cfg, "certify.dtype", ("float32", "float64"))
    _choice(cfg, "certify.last_layer", ("ball", "ball_box"))
    _number(cfg, "certify.seed", 0, integer=True)
    _number(cfg, "certify.attack.steps", 1, integer=True)
    _number(cfg, "certify.attack.restarts", 1, integer=True)
    _number(cfg, "certify.attack.step_size", 0, 2, lo_open=True)
    return cfg


def radius_tag(r: float) -> str:
    """File-name tag of a radius: 1.58 -> '1.58', 0.5 -> '0.5', 1 -> '1.0'."""
    _finite_nonneg(r, "radius")
    return repr(float(r))


STAGES = ("download", "train", "calibrate", "certify", "report")


def stage_config(cfg: dict, stage: str, radius: Optional[float] = None) -> dict:
    """The part of a composed config that one stage depends on.

    Orchestrators pass exactly this to the stage (and track it as the stage's
    parameters), so e.g. adding a certification radius does not retrain.
    """
    if stage == "download":
        return {"name": cfg["name"], "dataset": cfg["dataset"]}
    if stage == "train":
        ds = cfg["dataset"]
        return {"name": cfg["name"], "dataset": {"name": ds["name"], "mean": ds["mean"], "std": ds["std"]},
                "model": cfg["model"], "train": cfg["train"]}
    if stage == "calibrate":
        return {"name": cfg["name"], "calibrate": cfg["calibrate"]}
    if stage == "certify":
        if radius is None:
            raise ConfigError("certify needs a radius")
        _finite_nonneg(radius, "radius")
        cert = {k: v for k, v in cfg["certify"].items() if k != "radii"}
        return {"name": cfg["name"], "certify": cert, "radius": float(radius)}
    if stage == "report":
        return cfg
    raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
