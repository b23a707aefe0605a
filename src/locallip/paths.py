"""Where each stage writes, under ``results/<experiment>/``. One place for every orchestrator."""
from __future__ import annotations

from pathlib import Path

from .config import radius_tag

RESULTS = Path("results")


def experiment_dir(name: str, results: Path = RESULTS) -> Path:
    return Path(results) / name


def splits(name: str, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "data" / "splits.npz"


def model(name: str, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "train" / "model.pt"


def train_metrics(name: str, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "train" / "metrics.json"


def train_state(name: str, results: Path = RESULTS) -> Path:
    """Resume checkpoint: deliberately not a declared output, so a killed job keeps it."""
    return experiment_dir(name, results) / "train" / "state" / "last.pt"


def calibrated_model(name: str, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "calibrate" / "model.pt"


def calibration(name: str, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "calibrate" / "calibration.json"


def certificate(name: str, radius: float, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "certify" / f"radius_{radius_tag(radius)}.json"


def certificate_table(name: str, radius: float, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "certify" / f"radius_{radius_tag(radius)}.csv"


def report(name: str, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "report.md"


def plots_dir(name: str, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "plots"
