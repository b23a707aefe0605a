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
from typing import Any, List, Optional

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
    method: str = "lanczos"  # lanczos | power: how the masked layer norms are computed
    max_iter: int = 2000  # operator applications per layer
    tol: float = 1e-4  # relative residual of the top Ritz pair (lanczos) or Rayleigh quotient (power)
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


def _finite_nonneg(value: Any, name: str) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool)
           and math.isfinite(value) and value >= 0,
           f"{name} must be a finite number >= 0, got {value!r}")


def validate(cfg: dict) -> dict:
    """Range and choice checks that a dataclass schema cannot express."""
    ds, m, t, c, cal = cfg["dataset"], cfg["model"], cfg["train"], cfg["certify"], cfg["calibrate"]
    _check(ds["name"] in DATASET_NAMES,
           f"unknown dataset {ds['name']!r}; known: {', '.join(DATASET_NAMES)}")
    _check(len(ds["mean"]) == len(ds["std"]), "dataset.mean and dataset.std must have the same length")
    _check(all(s > 0 for s in ds["std"]), "dataset.std entries must be > 0")
    for k in ("val_size", "calib_size", "test_size"):
        _check(ds[k] > 0, f"dataset.{k} must be > 0, got {ds[k]}")
    _check(m["arch"] in ARCHS, f"unknown model.arch {m['arch']!r}; known: {', '.join(ARCHS)}")
    _check(m["activation"] in ACTIVATIONS,
           f"unknown model.activation {m['activation']!r}; known: {', '.join(ACTIVATIONS)}")
    _finite_nonneg(m["theta_init"], "model.theta_init")
    _check(t["bound"] in ("local", "global"), f"train.bound must be local or global, got {t['bound']!r}")
    _check(t["loss"] in ("bcp_mix", "gloro", "gloro_trades"),
           f"train.loss must be bcp_mix, gloro or gloro_trades, got {t['loss']!r}")
    _check(t["last_layer"] in ("ball", "ball_box"), "train.last_layer must be ball or ball_box")
    _check(t["ramp"] in ("linear", "log"), f"train.ramp must be linear or log, got {t['ramp']!r}")
    _check(t["device"] in ("auto", "cpu", "cuda"), "train.device must be auto, cpu or cuda")
    for k in ("eps", "eps_train", "lr", "weight_decay", "sparsity_weight", "kappa_end", "trades_lambda"):
        _finite_nonneg(t[k], f"train.{k}")
    _check(t["epochs"] >= 1 and t["batch_size"] >= 1, "train.epochs and train.batch_size must be >= 1")
    _check(t["power_iters"] >= 1, "train.power_iters must be >= 1")
    _check(t["local_solver"] in ("krylov", "power"), f"train.local_solver must be krylov or power, got {t['local_solver']!r}")
    _check(t["local_steps"] >= 1, "train.local_steps must be >= 1")
    _check(t["diagnostics_size"] >= 0, "train.diagnostics_size must be >= 0")
    _check(0 < t["lr_decay"] <= 1, "train.lr_decay must be in (0, 1]")
    _check(len(c["radii"]) > 0, "certify.radii must not be empty")
    for r in c["radii"]:
        _finite_nonneg(r, "every certify.radii entry")
    _check(len(set(map(float, c["radii"]))) == len(c["radii"]), "certify.radii has duplicates")
    _check(c["dtype"] in ("float32", "float64"), "certify.dtype must be float32 or float64")
    _check(c["last_layer"] in ("ball", "ball_box"), "certify.last_layer must be ball or ball_box")
    _check(c["max_iter"] >= 1 and c["tol"] > 0, "certify.max_iter must be >= 1 and certify.tol > 0")
    _check(c["method"] in ("lanczos", "power"), f"certify.method must be lanczos or power, got {c['method']!r}")
    _check(c["attack"]["steps"] >= 1 and c["attack"]["restarts"] >= 1,
           "certify.attack.steps and certify.attack.restarts must be >= 1")
    _finite_nonneg(cal["eps"], "calibrate.eps")
    _check(len(cal["scales"]) > 0 and all(s > 0 for s in cal["scales"]),
           "calibrate.scales must be a non-empty list of numbers > 0")
    _check(0 <= cal["max_clean_drop"] <= 1, "calibrate.max_clean_drop must be in [0, 1]")
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
