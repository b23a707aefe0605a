"""Typed configuration: Hydra composition into dataclasses with enums, validated once.

Every group under ``config/`` (dataset, model, train, calibrate, certify, run,
experiment) is checked against the dataclasses below when it is composed: an
unknown key, a wrongly typed value or a choice that is not in its enum fails
then, before any job runs; ``validate`` adds the ranges a schema cannot say.

``compose(experiment, overrides)`` gives a ``Config``. A stage receives only its
part (``stage_config``: a ``DownloadStage``, ``TrainStage``, ... object), and
orchestrators track that part as plain values (``plain``); ``from_plain`` turns
such values back into the typed object (and validates them) in the job.
Cosmetic settings (``run``: progress bars, threads) are in no stage's part, so
changing them reruns nothing.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Type, TypeVar, Union

from omegaconf import II, MISSING, OmegaConf

from .choices import (Activation, Arch, Bound, Choice, DatasetName, Device, DType, Guarantee,  # noqa: F401
                      LastLayer, LocalSolver, Loss, MaskedNorms, Method, Ramp)  # (re-exported: the schema's types)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


# --------------------------------------------------------------------------- schema


@dataclass
class DatasetConfig:
    name: DatasetName = DatasetName["mnist5k"]
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
    arch: Arch = Arch["4c3f"]
    activation: Activation = Activation["clipped_relu"]
    theta_init: float = 1.0  # initial clipping threshold of clipped activations


@dataclass
class TrainConfig:
    bound: Bound = Bound["local"]
    loss: Loss = Loss.bcp_mix
    last_layer: LastLayer = LastLayer.ball_box  # local bound only
    eps: float = II("eps")  # target certification radius
    eps_train: float = 1.74  # training radius (slightly above eps)
    epochs: int = 10
    warmup_epochs: int = 0  # clean training only
    ramp_epochs: int = 5  # eps 0 -> eps_train and kappa 1 -> 0
    ramp: Ramp = Ramp.linear
    kappa_end: float = 0.0
    trades_lambda: float = 1.5
    batch_size: int = 128
    lr: float = 1e-3
    lr_decay_start: int = 0  # epoch from which the LR decays exponentially (0 = at ramp end)
    lr_decay: float = 0.9  # per-epoch factor after lr_decay_start
    weight_decay: float = 0.0
    sparsity_weight: float = 0.0  # clipped activations only
    power_iters: int = 2  # power iterations per step (warm-started): global bound, and local_solver=power
    local_solver: LocalSolver = LocalSolver.krylov  # krylov: local_steps Lanczos steps; power: power_iters
    local_steps: int = 8  # Lanczos steps per layer and step for the local bound (warm-started)
    # Local bound: run the masked solver for every sample and layer (always), only where the masks can
    # change the norm by more than adaptive_tol (adaptive), or never (global norms: BCP).
    masked_norms: MaskedNorms = MaskedNorms.always
    adaptive_tol: float = 0.01
    diagnostics_size: int = 256  # validation points for the per-epoch bound diagnostics (0 = off)
    augment: bool = False  # random crop + flip (CIFAR / Tiny-ImageNet)
    val_every: int = 1
    val_max_iter: int = 100  # Lanczos steps (tol 1e-3) when certifying the validation split
    device: Device = Device.auto
    seed: int = 0


@dataclass
class CalibrateConfig:
    eps: float = II("eps")  # radius whose certified accuracy is maximised
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
class CertifySettings:
    """Everything that shapes a certificate at one radius."""

    # What a local-bound certificate promises: probabilistic (P(false) <= delta per point),
    # exact (deterministic), or estimate (converged from below, not a guarantee).
    guarantee: Guarantee = Guarantee.probabilistic
    # Each point gets the cheapest sound step that decides it (global, box, masked norms;
    # locallip.certify.cascade); false: the level above for every point.
    cascade: bool = True
    masked_norms: bool = True  # cascade: try masked layer norms on the points global and box leave open
    screen_steps: int = 8  # cascade: Lanczos steps of the from-below estimate that excludes points
    extra_guarantees: List[Guarantee] = field(default_factory=list)  # further levels reported beside it
    delta: float = 1.0e-9  # probabilistic: failure probability per certified point (union over layers)
    inflation: float = 0.01  # probabilistic: Lanczos steps chosen so the norm inflation is at most this
    steps: Optional[int] = None  # probabilistic: Lanczos steps per layer (null: from inflation)
    method: Method = Method.lanczos  # estimate/exact: how the masked layer norms are estimated
    max_iter: int = 2000  # estimate/exact: operator applications per layer
    tol: float = 1e-4  # estimate/exact: relative residual of the top Ritz pair (or Rayleigh quotient)
    # 64: on CPUs the per-step reorthogonalisation reads the whole Lanczos basis (steps x n per
    # point); smaller batches keep more of it in cache (about 1.2x faster than 256 on mnist5k).
    # The GPU experiments (cifar10, tinyimagenet) raise it.
    batch_size: int = 64
    dtype: DType = DType.float64  # float64 keeps rounding error far below the margins
    last_layer: LastLayer = LastLayer.ball_box
    seed: int = 0  # random starts of the Lanczos iterations (chosen before, and independent of, the data)
    attack: AttackConfig = field(default_factory=AttackConfig)


@dataclass
class CertifyConfig(CertifySettings):
    radii: List[float] = field(default_factory=lambda: [II("eps")])
    # Per test point, the largest certified radius (bisection on the local bound at `guarantee`),
    # for the report's certified-accuracy-vs-radius curve.
    curve: bool = True
    curve_max_radius: Optional[float] = None  # null: twice the largest of `radii`
    curve_tol: float = 0.02  # relative width of the final bisection interval
    # The radius search runs on bigger batches than certification: most of its evaluations are the
    # cheap global and box steps, whose cost per point falls with the batch.
    curve_batch_size: int = 256


@dataclass
class PaperRow:
    setting: str = MISSING
    system: str = MISSING
    eps: float = MISSING
    dataset: Optional[DatasetName] = None  # the paper's dataset (None: not stated)
    arch: Optional[Arch] = None  # the paper's architecture (None: not stated)
    clean: Optional[float] = None
    certified: Optional[float] = None
    source: str = ""


@dataclass
class ReportConfig:
    baseline: Optional[str] = None  # experiment shown side by side (e.g. the GloRo baseline)
    paper: List[PaperRow] = field(default_factory=list)


@dataclass
class RunConfig:
    """How a job runs, not what it computes: never part of a stage's tracked settings."""

    progress: bool = True  # progress bars (shown only on a terminal)
    threads: int = 0  # torch threads (0: torch's default)
    # Data-parallel processes for train, certify and radii (torchrun; one per GPU). Results match a
    # single process within float tolerance (training) or exactly (certification).
    processes: int = 1


@dataclass
class Config:
    name: str = "mnist5k"
    description: str = ""
    eps: float = 1.58  # the experiment's target radius; train.eps, calibrate.eps and certify.radii follow it
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------- stage parts


@dataclass
class Normalization:
    mean: List[float] = field(default_factory=list)
    std: List[float] = field(default_factory=list)


@dataclass
class DownloadStage:
    name: str = MISSING
    dataset: DatasetConfig = field(default_factory=DatasetConfig)


@dataclass
class TrainStage:
    name: str = MISSING
    normalization: Normalization = field(default_factory=Normalization)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = MISSING


@dataclass
class CalibrateStage:
    name: str = MISSING
    calibrate: CalibrateConfig = MISSING


@dataclass
class CertifyStage:
    name: str = MISSING
    radius: float = MISSING
    certify: CertifySettings = field(default_factory=CertifySettings)


@dataclass
class RadiiStage:
    name: str = MISSING
    max_radius: float = MISSING
    tol: float = 0.02
    batch_size: int = 256
    certify: CertifySettings = field(default_factory=CertifySettings)


STAGES = ("download", "train", "calibrate", "certify", "radii", "report")
StageConfig = Union[DownloadStage, TrainStage, CalibrateStage, CertifyStage, RadiiStage, Config]
STAGE_TYPES: Dict[str, type] = {"download": DownloadStage, "train": TrainStage, "calibrate": CalibrateStage,
                                "certify": CertifyStage, "radii": RadiiStage, "report": Config}


def stage_config(cfg: Config, stage: str, radius: Optional[float] = None) -> StageConfig:
    """The part of a composed config that one stage depends on (what orchestrators track).

    E.g. adding a certification radius does not retrain, and ``run`` settings rerun nothing.
    """
    if stage == "download":
        return DownloadStage(name=cfg.name, dataset=cfg.dataset)
    if stage == "train":
        return TrainStage(name=cfg.name, normalization=Normalization(list(cfg.dataset.mean), list(cfg.dataset.std)),
                          model=cfg.model, train=cfg.train)
    if stage == "calibrate":
        return CalibrateStage(name=cfg.name, calibrate=cfg.calibrate)
    if stage == "certify":
        if radius is None:
            raise ConfigError("certify needs a radius")
        check_radius(radius)
        return CertifyStage(name=cfg.name, radius=float(radius), certify=_settings(cfg.certify))
    if stage == "radii":
        top = cfg.certify.curve_max_radius or 2 * max(float(r) for r in cfg.certify.radii)
        return RadiiStage(name=cfg.name, max_radius=float(top) if top > 0 else 1.0, tol=cfg.certify.curve_tol,
                          batch_size=cfg.certify.curve_batch_size, certify=_settings(cfg.certify))
    if stage == "report":
        return dataclasses.replace(cfg, run=RunConfig())  # the report reads everything but `run`
    raise ConfigError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")


def _settings(c: CertifyConfig) -> CertifySettings:
    return CertifySettings(**{f.name: getattr(c, f.name) for f in fields(CertifySettings)})


# --------------------------------------------------------------------------- plain values


def plain(obj: Any) -> Any:
    """A dataclass (or list/dict of them) as plain JSON/YAML values; enums become their values."""
    if isinstance(obj, Enum):
        return obj.value
    if is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


T = TypeVar("T")


def from_plain(cls: Type[T], data: Any, what: str = "configuration") -> T:
    """Plain values (e.g. a stage's JSON) as a typed ``cls`` object, type- and range-checked."""
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a mapping, got {type(data).__name__}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(cls), data)
        obj = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid {what}: {explain(e)}") from None
    from .validation import validate_stage
    validate_stage(obj)
    return obj


def explain(e: BaseException) -> str:
    """The error and its causes on one line (Hydra's 'Error merging override' hides why in its cause)."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        lines = [ln.strip() for ln in str(e).strip().splitlines()]
        msg = next((ln for ln in lines if ln and not ln.startswith(("full_key", "reference_type", "object_type"))), "")
        if msg and "$VALUE" not in msg and not any(msg in p for p in parts):
            parts.append(msg)
        e = e.__cause__ or e.__context__
    return "; caused by: ".join(parts)


# --------------------------------------------------------------------------- composition


def default_config_dir() -> Path:
    """`config/` of the repository (the working directory first, then the source tree)."""
    here = Path.cwd() / "config"
    if (here / "config.yaml").exists():
        return here
    return Path(__file__).resolve().parents[3] / "config"


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    for group, node in (("dataset", DatasetConfig), ("model", ModelConfig), ("train", TrainConfig),
                        ("calibrate", CalibrateConfig), ("certify", CertifyConfig), ("run", RunConfig)):
        cs.store(group=group, name="schema", node=node)
    for name, fn in (("mul", lambda *a: math.prod(float(v) for v in a)),
                     ("div", lambda a, b: float(a) / float(b))):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def experiment_names(config_dir: Optional[Path] = None) -> List[str]:
    d = Path(config_dir or default_config_dir()) / "experiment"
    return sorted(p.stem for p in d.glob("*.yaml"))


def compose(experiment: Optional[str] = None, overrides: Optional[List[str]] = None,
            config_dir: Optional[Path] = None) -> Config:
    """Compose, resolve and validate the configuration of one experiment; ConfigError names any problem."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir or default_config_dir()).resolve()
    if not (config_dir / "config.yaml").exists():
        raise ConfigError(f"no config.yaml in config directory {config_dir}")
    overrides = list(overrides or [])
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} is not of the form key=value")
    if experiment is not None:
        known = experiment_names(config_dir)
        if experiment not in known:
            raise ConfigError(f"unknown experiment {experiment!r}; known: {', '.join(known)}")
        overrides = [f"experiment={experiment}"] + overrides
    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            raw = hydra_compose(config_name="config", overrides=overrides)
        raw_plain = OmegaConf.to_container(raw, resolve=True, throw_on_missing=True)
        raw_plain.pop("experiment", None)
        # Merging into the schema in struct mode rejects keys the schema lacks (`+train.epochz=3`).
        node = OmegaConf.merge(OmegaConf.structured(Config), raw_plain)
        cfg = OmegaConf.to_object(node)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"invalid configuration: {explain(e)}") from None
    finally:
        GlobalHydra.instance().clear()
    from .validation import validate
    return validate(cfg)


# --------------------------------------------------------------------------- radii


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_radius(value: Any, what: str = "radius") -> float:
    """A radius is a finite number >= 0; returns it as a float."""
    if not (_is_number(value) and math.isfinite(value) and value >= 0):
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def radius_tag(r: float) -> str:
    """File-name tag of a radius: 1.58 -> '1.58', 0.5 -> '0.5', 1 -> '1.0'."""
    return repr(check_radius(r))
