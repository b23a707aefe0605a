"""The report stage: ``results/<experiment>/report.md`` and its plots.

load (read and check every input) -> compare (the systems side by side, at equal epochs and
at equal training time) -> tables -> plots -> render (markdown). It reads what the other
stages wrote for this experiment and for each of its baselines, and writes the report,
``plots/*.png`` and ``certify/steps.csv`` atomically; nothing is written if an input is
missing or malformed, or if the certificates do not belong together. What it compares
against (the configuration as the workflow composed it) comes in its settings: it never
reads ``config/`` itself.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional, Sequence

from ... import __version__
from ...foundation import layout
from ...foundation.files import stage_lock, write_text
from ...foundation.schema import ReportStage, RunConfig
from .compare import System
from .load import load_experiment
from .plots import plot_bound_diagnostics, plot_certified_vs_radius, plot_certified_vs_time, plot_training
from .render import render_report
from .tables import levels_of, steps_csv

__all__ = ["baseline_names", "run_report"]


def _rel(target: Path, report_file: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(report_file).resolve().parent)).as_posix()


def baseline_names(cfg: ReportStage) -> List[str]:
    """The baselines in the order the experiment lists them (``report.baselines``), which is the
    order of the directories the workflow passes. The ``baselines`` mapping itself may arrive
    reordered (the job configuration is serialised with sorted keys), so it is not the order."""
    listed = [b for b in cfg.config.report.baselines if b in cfg.baselines]
    return listed + [b for b in cfg.baselines if b not in listed]


def run_report(cfg: ReportStage, experiment_dir: Path, out: Path, baseline_dirs: Optional[Sequence[Path]] = None,
               run: RunConfig = RunConfig()) -> Path:
    """Read the stage outputs of this experiment and its baselines, write the plots and the report."""
    main_cfg = cfg.config
    experiment_dir, out = Path(experiment_dir), Path(out)
    radii = [float(r) for r in main_cfg.certify.radii]
    dirs: List[Path] = [Path(d) for d in (baseline_dirs or [])]
    names = baseline_names(cfg)
    if len(dirs) != len(names):
        raise ValueError(f"the report of {main_cfg.name} compares {len(names)} baseline(s) ({', '.join(names) or 'none'})"
                         f" but was given {len(dirs)} baseline director{'y' if len(dirs) == 1 else 'ies'}")
    # Read and check every input first: nothing is written if any is missing or malformed.
    systems = [System(main_cfg.name, load_experiment(experiment_dir, radii, curve=main_cfg.curve.enabled,
                                                     label=main_cfg.name), main=True)]
    for name, d in zip(names, dirs):
        curve = (d / "certify" / "radii.csv").is_file()
        systems.append(System(name, load_experiment(d, radii, calibration=False, curve=curve, label=name)))
    with stage_lock(out, "report"):
        return _write(cfg, systems, out, experiment_dir)


def _write(cfg: ReportStage, systems: List[System], out: Path, experiment_dir: Path) -> Path:
    main_cfg, main = cfg.config, systems[0]
    root, name = experiment_dir.parent, main_cfg.name
    certs = main.exp["certificates"]
    others = systems[1:]
    plot_paths = {
        "training": plot_training(main.metrics, layout.training_plot(name, root), title=f"{name}: training",
                                  baselines=[(s.name, s.metrics) for s in others]),
        "diagnostics": plot_bound_diagnostics(main.metrics, layout.diagnostics_plot(name, root),
                                              title=f"{name}: local bound during training"),
        "certified_vs_radius": plot_certified_vs_radius(
            main.rows, layout.radius_plot(name, root), title=f"{name}: certified accuracy vs radius",
            baselines=[(s.name, s.rows, s.exp["radii"]) for s in others], paper=main_cfg.report.paper,
            radii=main.exp["radii"], level=levels_of(certs)[0]),
        "certified_vs_time": plot_certified_vs_time(
            [(f"{s.name} ({s.method})", s.time_curve()) for s in systems], layout.time_plot(name, root),
            title=f"{name}: validation certified accuracy at {main_cfg.eps:g} vs training time",
            budget=float(main.metrics["train_time_s"])),
    }
    rel = {k: _rel(v, out) for k, v in plot_paths.items()}
    for i, r in enumerate(main_cfg.certify.radii):
        rel[f"table_{i}"] = _rel(layout.certificate_table(name, r, root), out)
    exported = layout.exported(name, root)
    if all(p.is_file() for p in exported.values()):  # the export stage ran (the workflow runs it first)
        rel.update({f"export_{k}": _rel(v, out) for k, v in exported.items()})
    write_text(layout.steps_table(name, root), steps_csv(certs))
    text = render_report(main_cfg, systems, rel, reproduce=cfg.reproduce,
                         generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), version=__version__)
    write_text(out, text)
    return out
