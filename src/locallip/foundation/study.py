"""A study table, declared in ``config/study/<table>.yaml``: its rows (an experiment plus Hydra
overrides each, optionally several seeds), the radii it is certified at and the columns it shows.

``load_study`` checks a declaration against ``StudyDeclaration`` (an unknown key, a wrongly typed
value or a bad column fails with one line naming the file and the field); the pipeline composes
each row's experiment (``locallip.pipeline.study``) into a ``StudyRunStage``, the settings of one
row job (train, calibrate, certify on the validation and test splits).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import MISSING

from .choices import Choice
from .schema import CalibrateStage, CertifySettings, ConfigError, TrainStage

STUDY_DIR = "study"  # under config/
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
RESERVED_TAGS = ("data", "logs")


class StudyColumn(Choice):
    """What a study table can show beside each row's run, experiment and overrides."""

    train_s = "train_s"  # training wall time, seconds
    val_cert = "val_cert"  # validation certified accuracy, local certificate, one column per radius
    val_global = "val_global"  # the same model's global certificate on validation, per radius
    val_clean = "val_clean"
    test_cert = "test_cert"
    test_global = "test_global"
    test_clean = "test_clean"
    fixed = "fixed"  # % of neurons fixed per layer at the last epoch
    train_converged = "train_converged"  # training bound over the converged bound (median), last epoch
    audit_broken = "audit_broken"  # certified points the attack audit broke, every split and radius


#: bench/study.py's columns, in its order (the tables of docs/study.md), plus the audit.
DEFAULT_COLUMNS = ["train_s", "val_cert", "test_cert", "test_global", "test_clean", "fixed", "train_converged",
                   "audit_broken"]


@dataclass
class StudyRow:
    tag: str = MISSING  # the row's name (results/study/<table>/<tag>/)
    experiment: str = MISSING  # config/experiment/<experiment>.yaml
    overrides: List[str] = field(default_factory=list)  # Hydra overrides, after the table's
    # Training seeds (train.seed): one run each, results/study/<table>/<tag>_seed<s>/; the table shows
    # their mean and standard error. Empty: one run with the experiment's own seed.
    seeds: List[int] = field(default_factory=list)


@dataclass
class StudyDeclaration:
    title: str = ""
    description: str = ""
    radii: List[float] = MISSING  # certification radii, on both splits
    test_limit: Optional[int] = None  # certify only the first N points of the test split (null: all)
    overrides: List[str] = field(default_factory=list)  # applied to every row first
    columns: List[StudyColumn] = field(default_factory=lambda: [StudyColumn(c) for c in DEFAULT_COLUMNS])
    rows: List[StudyRow] = MISSING


@dataclass
class StudyRunStage:
    """The settings of one row job (one seed of one row): what it trains, calibrates and certifies."""

    table: str = MISSING
    run: str = MISSING  # the run's directory name: the row's tag, or <tag>_seed<s>
    tag: str = MISSING
    experiment: str = MISSING
    overrides: List[str] = field(default_factory=list)  # the row's overrides as declared (the table's first)
    seed: Optional[int] = None
    radii: List[float] = field(default_factory=list)
    test_limit: Optional[int] = None
    train: TrainStage = MISSING
    calibrate: CalibrateStage = MISSING
    certify: CertifySettings = field(default_factory=CertifySettings)


@dataclass
class StudyTableRow:
    tag: str = MISSING
    runs: List[str] = MISSING  # its runs' directory names (one per seed)


@dataclass
class StudyTableStage:
    """What the table job renders: the rows in order and the columns, from the declaration."""

    table: str = MISSING
    title: str = ""
    description: str = ""
    radii: List[float] = MISSING
    columns: List[StudyColumn] = MISSING
    rows: List[StudyTableRow] = MISSING


def study_names(config_dir: Path) -> List[str]:
    return sorted(p.stem for p in (Path(config_dir) / STUDY_DIR).glob("*.yaml"))


def study_file(config_dir: Path, name: str) -> Path:
    return Path(config_dir) / STUDY_DIR / f"{name}.yaml"


def load_study(path: Path) -> StudyDeclaration:
    """The declaration in ``path``, checked; ConfigError names the file and the field."""
    import yaml

    from .compose import from_plain

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such study declaration")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study declaration is a mapping (title, radii, rows, ...)")
    decl = from_plain(StudyDeclaration, data, f"study declaration {path}")
    _check(decl, path)
    return decl


def _check(decl: StudyDeclaration, path: Path) -> None:
    """What the dataclass cannot say: names, radii, limits, unique runs."""
    if not decl.rows:
        raise ConfigError(f"{path}: rows: a study has at least one row")
    if not decl.radii:
        raise ConfigError(f"{path}: radii: a study certifies at one radius at least")
    for r in decl.radii:
        if not (math.isfinite(r) and r > 0):
            raise ConfigError(f"{path}: radii: every radius must be a finite number > 0, got {r!r}")
    if len(set(decl.radii)) != len(decl.radii):
        raise ConfigError(f"{path}: radii: {list(decl.radii)} names a radius twice")
    if decl.test_limit is not None and decl.test_limit < 1:
        raise ConfigError(f"{path}: test_limit must be >= 1 (or null: the whole test split), got {decl.test_limit}")
    if len(set(decl.columns)) != len(decl.columns):
        raise ConfigError(f"{path}: columns: a column is named twice")
    seen = {}
    for i, row in enumerate(decl.rows):
        where = f"{path}: rows[{i}]"
        if not TAG_RE.fullmatch(row.tag):
            raise ConfigError(f"{where}.tag must be letters, digits, '_' or '-' (it names a directory), "
                              f"got {row.tag!r}")
        if row.tag in RESERVED_TAGS:  # directories of results/study/<table>/ that hold no row
            raise ConfigError(f"{where}.tag {row.tag!r} is reserved (results/study/<table>/{row.tag}/)")
        if any(s < 0 for s in row.seeds) or len(set(row.seeds)) != len(row.seeds):
            raise ConfigError(f"{where}.seeds must be distinct integers >= 0, got {list(row.seeds)}")
        if any("=" not in o for o in row.overrides):
            raise ConfigError(f"{where}.overrides: every override is key=value, got {list(row.overrides)}")
        for run, _ in runs_of(row):
            if run in seen:
                raise ConfigError(f"{where}: run {run!r} is also a run of rows[{seen[run]}]")
            seen[run] = i


def runs_of(row: StudyRow) -> List[Tuple[str, Optional[int]]]:
    """(run directory name, seed) of each run of ``row``: the tag, or <tag>_seed<s> per seed."""
    if not row.seeds:
        return [(row.tag, None)]
    return [(f"{row.tag}_seed{s}", int(s)) for s in row.seeds]
