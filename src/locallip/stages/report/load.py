"""Reading what the other stages wrote, checked before anything is drawn or written.

Every input is read and validated first: a missing or malformed file raises
(FileNotFoundError / ValueError naming it) and leaves an existing report untouched.
Certificates carry their provenance (settings, model digest, code version); the
report refuses to combine certificates from different models or settings, or a
model that is not the one ``train/metrics.json`` describes.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, List, Optional, Sequence

from ...foundation import layout
from ...foundation.files import read_json

RADIUS_MATCH_TOL = 1e-6

METRICS_KEYS = ("epochs", "best_epoch", "device", "torch", "train_time_s", "bound", "loss", "params")
EPOCH_KEYS = ("epoch", "loss", "val_clean_acc", "val_certified_acc", "eps")
CALIBRATION_KEYS = ("applicable", "message")
CERTIFICATE_KEYS = ("radius", "n", "clean_acc", "certified_acc_local", "certified_acc_global",
                    "median_bound_ratio", "not_converged", "samples_per_s", "time_s", "device",
                    "torch", "guarantee", "guarantee_level", "levels", "attack", "bound_used_for_training",
                    "provenance")
ATTACK_KEYS = ("steps", "restarts", "step_size", "checked", "broken")
PROVENANCE_KEYS = ("settings", "model", "code_version")


def _require(obj: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")


def load_metrics(path: Path) -> dict:
    m = read_json(path)
    _require(m, METRICS_KEYS, str(path))
    if not isinstance(m["epochs"], list):
        raise ValueError(f"{path}: 'epochs' must be a list")
    for i, e in enumerate(m["epochs"]):
        _require(e, EPOCH_KEYS, f"{path}: epochs[{i}]")
    return m


def load_calibration(path: Path) -> dict:
    c = read_json(path)
    _require(c, CALIBRATION_KEYS, str(path))
    if c["applicable"]:
        _require(c, ("eps", "max_clean_drop", "tried", "chosen_scale", "before", "after"), str(path))
    return c


def load_certificate(path: Path, radius: float) -> dict:
    c = read_json(path)
    _require(c, CERTIFICATE_KEYS, str(path))
    _require(c["attack"], ATTACK_KEYS, f"{path}: attack")
    _require(c["provenance"], PROVENANCE_KEYS, f"{path}: provenance")
    if abs(float(c["radius"]) - float(radius)) > RADIUS_MATCH_TOL:
        raise ValueError(f"{path}: holds radius {c['radius']}, expected {radius} (stale file?)")
    return c


def load_radii(path: Path) -> List[dict]:
    """Per-point certified radii (``radii`` stage): local and global."""
    if not path.is_file():
        raise FileNotFoundError(f"report input missing: {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ("label", "prediction", "certified_radius_local", "certified_radius_global")
    if not rows or any(k not in rows[0] for k in need):
        raise ValueError(f"{path}: expected columns {', '.join(need)}")
    try:
        return [{"label": int(r["label"]), "prediction": int(r["prediction"]),
                 "local": float(r["certified_radius_local"]), "global": float(r["certified_radius_global"])}
                for r in rows]
    except ValueError as e:
        raise ValueError(f"{path}: malformed row: {e}") from None


def check_inputs_exist(paths: Sequence[Path]) -> None:
    """Raise FileNotFoundError naming every missing input (before anything is written)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    failed = [str(layout.audit_failure(Path(p))) for p in paths if layout.audit_failure(Path(p)).is_file()]
    if failed:
        raise FileNotFoundError("certification failed its attack audit (see " + ", ".join(failed) + "); "
                                "no report is made from it")
    if missing:
        raise FileNotFoundError("report input(s) missing: " + ", ".join(missing))


def check_consistency(exp: dict, label: str) -> None:
    """One model, one set of settings, one code version across an experiment's certificates, and the
    model is the one its training metrics describe."""
    certs = exp["certificates"]
    if not certs:
        return

    def settings(c):
        s = dict(c["provenance"]["settings"])
        s.pop("radius", None)
        return s

    first = certs[0]
    for c in certs[1:]:
        where = f"{label}: certificates at radius {first['radius']} and {c['radius']}"
        if c["provenance"]["model"]["sha256"] != first["provenance"]["model"]["sha256"]:
            raise ValueError(f"{where} were made from different models; rerun certify for every radius")
        if settings(c) != settings(first):
            raise ValueError(f"{where} were made with different settings; rerun certify for every radius")
        if c["provenance"]["code_version"] != first["provenance"]["code_version"]:
            raise ValueError(f"{where} were made by different code versions; rerun certify for every radius")
    m = exp["metrics"]
    model = first["provenance"]["model"]
    if m.get("code_version") and model.get("train_code_version") and m["code_version"] != model["train_code_version"]:
        raise ValueError(f"{label}: the certified model was trained by code {model['train_code_version']}, but "
                         f"train/metrics.json describes a run of code {m['code_version']}; rerun calibrate and certify")
    if model.get("epoch") is not None and model["epoch"] != m["best_epoch"]:
        raise ValueError(f"{label}: the certified model is epoch {model['epoch']}, but train/metrics.json chose "
                         f"epoch {m['best_epoch']}; rerun calibrate and certify")


def load_experiment(experiment_dir: Path, radii: Sequence[float], calibration: bool = True,
                    curve: bool = False, label: Optional[str] = None) -> dict:
    """Everything the report needs from one experiment directory, checked.

    Returns {"dir", "metrics", "calibration" (or None), "certificates": [json per radius, in the
    order of ``radii``], "radii": per-point radii or None}.
    """
    experiment_dir = Path(experiment_dir)
    name = experiment_dir.name
    needed = [experiment_dir / "train" / "metrics.json"]
    needed += [layout.certificate(name, r, experiment_dir.parent) for r in radii]
    if calibration:
        needed.append(layout.calibration(name, experiment_dir.parent))
    if curve:
        needed.append(layout.radii_table(name, experiment_dir.parent))
    check_inputs_exist(needed)
    exp = {
        "dir": experiment_dir,
        "metrics": load_metrics(layout.train_metrics(name, experiment_dir.parent)),
        "calibration": load_calibration(layout.calibration(name, experiment_dir.parent)) if calibration else None,
        "certificates": [load_certificate(layout.certificate(name, r, experiment_dir.parent), r) for r in radii],
        "radii": load_radii(layout.radii_table(name, experiment_dir.parent)) if curve else None,
    }
    check_consistency(exp, label or name)
    return exp
