"""Where each stage writes, under ``results/<experiment>/``: the only description of the layout."""
from __future__ import annotations

from pathlib import Path

from .ranges import radius_tag

RESULTS = Path("results")


def experiment_dir(name: str, results: Path = RESULTS) -> Path:
    return Path(results) / name


def external_dir(name: str, results: Path = RESULTS) -> Path:
    """Where ``locallip certify-model`` writes for an external model (config/external/<name>.yaml)."""
    return Path(results) / "external" / name


def export_dir(name: str, results: Path = RESULTS) -> Path:
    """The experiment's calibrated model in load-safe form, with its model card."""
    return experiment_dir(name, results) / "export"


def exported(name: str, results: Path = RESULTS) -> dict:
    """The export stage's files: weights, layer list, model card (markdown and JSON)."""
    d = export_dir(name, results)
    return {"weights": d / "model.safetensors", "architecture": d / "model.json", "card": d / "model_card.md",
            "card_json": d / "model_card.json"}


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


def _tag(radius) -> str:
    """A radius's file-name tag; a string is used as given (a wildcard pattern such as '{radius}')."""
    return radius if isinstance(radius, str) else radius_tag(radius)


def certificate(name: str, radius, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "certify" / f"radius_{_tag(radius)}.json"


def certificate_table(name: str, radius, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "certify" / f"radius_{_tag(radius)}.csv"


def report(name: str, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "report.md"


def plots_dir(name: str, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "plots"


def logs_dir(name: str, results: Path = RESULTS) -> Path:
    return experiment_dir(name, results) / "logs"


def audit_failure(certificate_path: Path) -> Path:
    """Where a failed attack audit is recorded, beside the certificate it replaces."""
    return Path(str(certificate_path) + ".audit-failed.json")


def last_good(model_path: Path) -> Path:
    """Where train keeps a copy of its last completed run's model and metrics (``train/last_good/``):
    an orchestrator removes a job's outputs before rerunning it, and a failing rerun would
    otherwise leave no model at all."""
    return Path(model_path).parent / "last_good"


def training_plot(name: str, results: Path = RESULTS) -> Path:
    return plots_dir(name, results) / "training.png"


def time_plot(name: str, results: Path = RESULTS) -> Path:
    """Validation certified accuracy against cumulative training time, this model and its baselines."""
    return plots_dir(name, results) / "certified_vs_time.png"


def radius_plot(name: str, results: Path = RESULTS) -> Path:
    return plots_dir(name, results) / "certified_vs_radius.png"


def radii_table(name: str, results: Path = RESULTS) -> Path:
    """Per test point, the largest certified radius (local and global bound)."""
    return experiment_dir(name, results) / "certify" / "radii.csv"


def steps_table(name: str, results: Path = RESULTS) -> Path:
    """Per radius and guarantee level: certified points per cascade step (written by the report)."""
    return experiment_dir(name, results) / "certify" / "steps.csv"


def diagnostics_plot(name: str, results: Path = RESULTS) -> Path:
    return plots_dir(name, results) / "bound_diagnostics.png"


def study_dir(table: str, results: Path = RESULTS) -> Path:
    """A study table's rows and table (config/study/<table>.yaml): results/study/<table>/."""
    return Path(results) / "study" / table


def study_run_dir(table: str, run: str, results: Path = RESULTS) -> Path:
    return study_dir(table, results) / run


def study_run(table: str, run: str, results: Path = RESULTS) -> dict:
    """One row job's files: the trained and calibrated models, their summaries and the row."""
    return study_run_files(study_run_dir(table, run, results))


def study_run_files(d: Path) -> dict:
    """The files of a row job writing to directory ``d``."""
    d = Path(d)
    return {"row": d / "row.json", "model": d / "model.pt", "metrics": d / "metrics.json",
            "calibrated": d / "calibrated.pt", "calibration": d / "calibration.json"}


def study_state(run_dir: Path) -> Path:
    """A row's training resume checkpoint (not a declared output: a killed job keeps it)."""
    return Path(run_dir) / "state" / "last.pt"


def study_splits(table: str, key: str, results: Path = RESULTS) -> Path:
    """The splits a study's rows train on, one file per dataset setting (``key``: its name and digest)."""
    return study_dir(table, results) / "data" / f"{key}.npz"


def study_table(table: str, results: Path = RESULTS) -> dict:
    d = study_dir(table, results)
    return {"markdown": d / "table.md", "json": d / "table.json", "csv": d / "table.csv"}
