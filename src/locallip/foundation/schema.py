"""The configuration's schema: dataclasses with enums, the one place every default is written.

Every group under ``config/`` (dataset, model, train, calibrate, certify, curve, run,
experiment) is checked against these dataclasses when it is composed (``compose``): an
unknown key, a wrongly typed value or a choice that is not in its enum fails then, before
any job runs; ``ranges`` adds the ranges a schema cannot say. A stage receives only its
part (``DownloadStage``, ``TrainStage``, ...); cosmetic settings (``run``: progress bars,
threads) are in no stage's part, so changing them reruns nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import II, MISSING

from .choices import (Activation, Arch, AttackMethod, Audit, Bound, Choice, DatasetName, Device, DType, Guarantee,  # noqa: F401
                      LastLayer, NormSolver, Loss, MaskedNorms, Method, Ramp, Switch)  # (re-exported: the schema's types)


from .radius import ConfigError  # noqa: E402,F401  (defined torch- and omegaconf-free; re-exported here)


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
    # Residual architectures only (catalog.RESIDUAL_ARCHITECTURES): the number of blocks and their
    # channels (None: the catalog's).
    depth: Optional[int] = None
    width: Optional[int] = None


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
    # How the training step estimates layer norms, warm-started from last step's vectors: krylov
    # (solver_steps Lanczos steps per layer) or power (power_iters power iterations per layer). It
    # estimates the masked local norms and the global norms (GloRo's bound, BCP's, the warm start).
    solver: NormSolver = NormSolver.krylov
    solver_steps: int = 8
    power_iters: int = 2
    # Local bound: run the masked solver only where a batch's masks can change a layer's norm by more
    # than adaptive_tol (adaptive: the others take the global norm), for every sample and layer
    # (always), or never (global norms everywhere: BCP's bound, with the boxes kept).
    masked_norms: MaskedNorms = MaskedNorms.adaptive
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
    # margin: multi-targeted, all restarts batched, early stop (locallip.attack); pgd: the older plain PGD
    method: AttackMethod = AttackMethod.margin
    steps: int = 50  # per restart; the margin attack stops a restart earlier once it stalls
    restarts: int = 5
    step_size: float = 0.1  # fraction of the radius per step (the margin attack's first step)
    patience: int = 3  # margin attack: steps without a 0.1% drop of the margin before a restart slows or stops
    # The search runs in this dtype (float32: about twice as fast on CPUs); the point it finds is
    # evaluated again in the certification dtype, so a reported break is the model's own margin.
    dtype: DType = DType.float32
    # null: attack every certified point. b > 0: the audit's seconds stay within about b x the
    # certification's (per process); each batch attacks a seeded random subset of its robust points
    # that the allowance covers, each of them fully, and the summary counts the others.
    budget: Optional[float] = None


@dataclass
class CertifySettings:
    """Everything that shapes a certificate at one radius."""

    # What a local-bound certificate promises: probabilistic (P(false) <= delta per point),
    # exact (deterministic), or estimate (converged from below, not a guarantee).
    guarantee: Guarantee = Guarantee.probabilistic
    # Each point gets the cheapest sound step that decides it (global, box, masked norms;
    # locallip.certify.cascade); false: the level above for every point.
    cascade: bool = True
    masked_step: bool = True  # cascade: try masked layer norms on the points global and box leave open
    screen_steps: int = 8  # cascade: Lanczos steps of the from-below estimate that excludes points
    # cascade: a linear relaxation (CROWN) as the last step, for the correct points still undecided (about
    # 0.1 s a point on a small CNN). auto: off in the pipeline; in certify-model on, but off for
    # networks with clipped activations (trained here for a local bound: the step found nothing there).
    linear_relaxation: Switch = Switch.auto
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
    radii: List[float] = field(default_factory=lambda: [II("eps")])  # one certify job per radius


@dataclass
class CurveConfig:
    """The radii stage: per test point, the largest certified radius (root search on the local
    certificate at ``certify.guarantee``), for the report's certified-accuracy-vs-radius curve."""

    enabled: bool = True
    max_radius: Optional[float] = None  # null: twice the largest of certify.radii
    tol: float = 0.02  # relative width of the search's final bracket
    # Bigger batches than certification: most of the search's evaluations are the cheap global and
    # box steps, whose cost per point falls with the batch.
    batch_size: int = 256


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
    # Experiments shown side by side with this one (e.g. its GloRo and BCP baselines), in order.
    baselines: List[str] = field(default_factory=list)
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
    name: str = MISSING  # results/<name>/: every experiment sets it (none set is refused, not guessed)
    description: str = ""
    eps: float = 1.58  # the experiment's target radius; train.eps, calibrate.eps and certify.radii follow it
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)
    certify: CertifyConfig = field(default_factory=CertifyConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)
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


@dataclass
class ExportStage:
    """The calibrated model in load-safe form (safetensors + a JSON layer list) and its model card."""

    name: str = MISSING
    radii: List[float] = field(default_factory=list)  # the certificates the card reports


@dataclass
class ExternalModel:
    """A model trained anywhere, to certify (``locallip certify-model``; config/external/<name>.yaml)."""

    name: str = MISSING  # results/external/<name>/
    model: str = MISSING  # its weights: a state_dict in safetensors or torch weights-only format
    architecture: str = MISSING  # its layers: a JSON layer list (locallip.nn.describe)
    # The points: an .npz of images ``x`` (uint8, or floats in [0, 1]; [N, C, H, W] or [N, H, W]) and
    # labels ``y``; a locallip splits file (its test split); or ``dataset:<name>`` (that dataset's test split).
    data: str = MISSING
    radii: List[float] = field(default_factory=lambda: [0.1])
    limit: Optional[int] = None  # the first N points only
    # The per-channel normalization the model expects of its inputs (folded into its first layer),
    # unless its architecture starts with a normalize layer already.
    normalization: Normalization = field(default_factory=Normalization)
    certify: CertifySettings = field(default_factory=CertifySettings)
    # The attack on every certified point: full (certify.attack), quick (10 steps, 1 start; a sanity
    # check at a small fraction of the cost) or off (the report then says nothing was attacked).
    audit: Audit = Audit.full
    # The per-point radii (certify/radii.csv); curve.max_radius null: twice the largest of radii.
    curve: CurveConfig = field(default_factory=CurveConfig)


@dataclass
class ReportStage:
    """What the report compares: this experiment's configuration and its baselines' (as composed
    when the workflow was set up: the report never reads config/ itself)."""

    config: Config = field(default_factory=Config)
    baselines: Dict[str, Config] = field(default_factory=dict)
    # The stage commands that rebuild this experiment, one per job (the orchestration writes them).
    reproduce: List[str] = field(default_factory=list)
