"""The report stage: ``results/<experiment>/report.md`` and its plots.

load (read and check every input) -> tables -> plots -> render (markdown). It reads
what the other stages wrote, optionally the same files of a baseline experiment,
and writes the report and ``plots/*.png`` atomically; nothing is written if an
input is missing or malformed, or if the certificates do not belong together.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from ... import __version__
from ...pipeline import layout
from ...pipeline.config import Config, ConfigError, compose, experiment_names
from ...pipeline.files import stage_lock, write_text
from .load import load_experiment
from .plots import plot_bound_diagnostics, plot_certified_vs_radius, plot_training
from .render import recorded_settings, render_report, settings_drift
from .tables import headline_rows, levels_of, steps_csv

__all__ = ["run_report"]


def _rel(target: Path, report_file: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(report_file).resolve().parent)).as_posix()


def run_report(cfg: Config, experiment_dir: Path, out: Path, baseline_dir: Optional[Path] = None) -> Path:
    """Read the stage outputs, write the plots and the report; returns the report path."""
    experiment_dir, out = Path(experiment_dir), Path(out)
    radii = [float(r) for r in cfg.certify.radii]
    baseline_name = None
    # Read and check every input first: nothing is written if any is missing or malformed.
    main = load_experiment(experiment_dir, radii, curve=cfg.certify.curve, label=cfg.name)
    baseline = None
    if baseline_dir is not None:
        baseline_dir = Path(baseline_dir)
        baseline_name = cfg.report.baseline or baseline_dir.name
        curve = (baseline_dir / "certify" / "radii.csv").is_file()
        baseline = load_experiment(baseline_dir, radii, calibration=False, curve=curve, label=baseline_name)
    with stage_lock(out, "report"):
        return _write(cfg, main, out, experiment_dir, baseline, baseline_name)


def _write(cfg: Config, main: dict, out: Path, experiment_dir: Path, baseline: Optional[dict],
           baseline_name: Optional[str]) -> Path:
    results_root = experiment_dir.parent
    name = cfg.name
    drift = ([], [])
    try:  # how the recorded settings differ from what config/ composes to now
        if name in experiment_names():
            drift = settings_drift(compose(name), recorded_settings(main))
    except ConfigError:
        drift = ([], ["(config/experiment/" + name + ".yaml no longer composes)"])
    rows = headline_rows(main["certificates"])
    brows = headline_rows(baseline["certificates"]) if baseline is not None else None
    level = levels_of(main["certificates"])[0]
    plot_paths = {
        "training": plot_training(main["metrics"], layout.training_plot(name, results_root), title=f"{name}: training",
                                  baseline_metrics=baseline["metrics"] if baseline else None,
                                  baseline_label=baseline_name or "baseline"),
        "diagnostics": plot_bound_diagnostics(main["metrics"], layout.diagnostics_plot(name, results_root),
                                              title=f"{name}: local bound during training"),
        "certified_vs_radius": plot_certified_vs_radius(
            rows, layout.radius_plot(name, results_root), title=f"{name}: certified accuracy vs radius",
            baseline_rows=brows, baseline_label=baseline_name or "baseline", paper=cfg.report.paper,
            radii=main["radii"], baseline_radii=baseline["radii"] if baseline else None, level=level),
    }
    rel = {k: _rel(v, out) for k, v in plot_paths.items()}
    for i, r in enumerate(cfg.certify.radii):
        rel[f"table_{i}"] = _rel(layout.certificate_table(name, r, results_root), out)
    cfgs = {name: cfg}
    if baseline_name and cfg.report.baseline:
        try:
            cfgs[baseline_name] = compose(baseline_name)
        except ConfigError:
            pass
    write_text(layout.steps_table(name, results_root), steps_csv(main["certificates"]))
    text = render_report(cfg, main, rel, baseline=baseline, baseline_name=baseline_name,
                         generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), drift=drift,
                         cfgs_for_dag=cfgs, version=__version__)
    write_text(out, text)
    return out
