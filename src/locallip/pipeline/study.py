"""Study tables as pipeline jobs: a declaration (``config/study/<table>.yaml``) composed into jobs.

    study_download  results/study/<table>/data/<key>.npz     (``locallip download``, one per dataset setting)
    study_row       results/study/<table>/<run>/row.json     (``locallip study-row``: train, calibrate,
                                                              certify validation and test)
    study_table     results/study/<table>/table.{md,json,csv} (``locallip study-table``)

``plan(table)`` composes every row's experiment with its overrides (Hydra, as an experiment is)
into the settings of its job; ``*_command`` give the command lines the Snakemake rules
(``workflow/rules/study.smk``) run, the settings inline as JSON (so Snakemake reruns a row when
its settings change, and only that row). No torch is imported here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ..foundation import layout
from ..foundation.compose import compose, default_config_dir, from_plain, plain, settings_json
from ..foundation.schema import ConfigError, DownloadStage, RunConfig
from ..foundation.study import (StudyDeclaration, StudyRunStage, StudyTableRow, StudyTableStage, load_study,
                                runs_of, study_file, study_names)
from .table import stage_config

__all__ = ["StudyPlan", "plan", "plan_declaration", "download_command", "row_command", "table_command", "study_names",
           "add_study_parsers"]


@dataclass
class StudyPlan:
    """One table's jobs: each run's settings and splits, each dataset setting's download, the table's."""

    table: str
    declaration: StudyDeclaration
    runs: Dict[str, StudyRunStage]  # run directory name -> its settings
    splits: Dict[str, str]  # run -> the key of the splits it trains on
    downloads: Dict[str, DownloadStage]  # splits key -> download settings
    render: StudyTableStage


def splits_key(download: DownloadStage) -> str:
    """A dataset setting's file name: its dataset and a digest of every setting that shapes the splits."""
    text = json.dumps(plain(download.dataset), sort_keys=True)
    return f"{download.dataset.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def plan(table: str, config_dir: Optional[Path] = None) -> StudyPlan:
    """Compose table ``table``'s rows; ConfigError names the file, the row and the problem."""
    config_dir = Path(config_dir or default_config_dir())
    path = study_file(config_dir, table)
    if not path.is_file():
        raise ConfigError(f"unknown study {table!r} (no {path}); known: {', '.join(study_names(config_dir)) or 'none'}")
    where = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path  # short, where it can be
    return plan_declaration(table, load_study(where), config_dir, str(where))


def plan_declaration(table: str, decl: StudyDeclaration, config_dir: Optional[Path] = None,
                     where: str = "study") -> StudyPlan:
    """The jobs of a checked declaration (``where`` names it in errors)."""
    runs, splits, downloads, rows = {}, {}, {}, []
    radii = [float(r) for r in decl.radii]
    for i, row in enumerate(decl.rows):
        for run, seed in runs_of(row):
            overrides = [*decl.overrides, *row.overrides]
            try:
                cfg = compose(row.experiment, overrides + ([f"train.seed={seed}"] if seed is not None else []),
                              config_dir)
            except ConfigError as e:
                raise ConfigError(f"{where}: rows[{i}] ({row.tag}): {e}") from None
            download = DownloadStage(name=table, dataset=cfg.dataset)
            key = splits_key(download)
            downloads[key], splits[run] = download, key
            runs[run] = StudyRunStage(table=table, run=run, tag=row.tag, experiment=row.experiment,
                                      overrides=overrides, seed=seed, radii=radii, test_limit=decl.test_limit,
                                      train=stage_config(cfg, "train"), calibrate=stage_config(cfg, "calibrate"),
                                      certify=stage_config(cfg, "certify", radii[0]).certify)
        rows.append(StudyTableRow(tag=row.tag, runs=[r for r, _ in runs_of(row)]))
    render = StudyTableStage(table=table, title=decl.title, description=decl.description, radii=radii,
                             columns=list(decl.columns), rows=rows)
    return StudyPlan(table, decl, runs, splits, downloads, render)


def _inline(settings) -> str:
    return json.dumps(plain(settings), sort_keys=True, separators=(",", ":"))


def download_command(p: StudyPlan, key: str) -> List[str]:
    if key not in p.downloads:
        raise ConfigError(f"study {p.table} trains on no splits {key!r}")
    return ["locallip", "download", "--cfg-json", _inline(p.downloads[key]),
            "--out", str(layout.study_splits(p.table, key))]


def row_command(p: StudyPlan, run: str) -> List[str]:
    if run not in p.runs:
        raise ConfigError(f"study {p.table} has no run {run!r}; its runs: {', '.join(p.runs)}")
    return ["locallip", "study-row", "--cfg-json", _inline(p.runs[run]),
            "--data", str(layout.study_splits(p.table, p.splits[run])),
            "--out-dir", str(layout.study_run_dir(p.table, run))]


def row_files(p: StudyPlan) -> List[str]:
    return [str(layout.study_run(p.table, run)["row"]) for run in p.runs]


def table_command(p: StudyPlan) -> List[str]:
    out = layout.study_table(p.table)
    argv = ["locallip", "study-table", "--cfg-json", _inline(p.render)]
    for f in row_files(p):
        argv += ["--row", f]
    return argv + ["--out", str(out["markdown"]), "--json", str(out["json"]), "--csv", str(out["csv"])]


# --------------------------------------------------------------------------- the CLI commands


def _run_options(args) -> RunConfig:
    return RunConfig(progress=bool(args.progress), threads=args.threads or 0)


def _settings(args, cls, pick):
    """A command's settings: given inline (--cfg-json, as the rules pass them) or composed from config/study/."""
    if args.cfg_json and args.study:
        raise ConfigError("give either --cfg-json or --study, not both")
    if args.cfg_json:
        return from_plain(cls, settings_json(args.cfg_json), f"{cls.__name__} settings"), None
    if not args.study:
        raise ConfigError("give --study TABLE (config/study/TABLE.yaml) or --cfg-json")
    p = plan(args.study)
    return pick(p), p


def _cmd_study_row(args) -> int:
    from ..stages.study import run_study_row
    from ..stages.download import run_download

    def pick(p: StudyPlan):
        if args.run not in p.runs:
            raise ConfigError(f"study {p.table} has no run {args.run!r}; its runs: {', '.join(p.runs)}")
        return p.runs[args.run]

    cfg, p = _settings(args, StudyRunStage, pick)
    data = Path(args.data) if args.data else None
    if data is None:
        if p is None:
            raise ConfigError("study-row --cfg-json needs --data (the splits file)")
        data = layout.study_splits(p.table, p.splits[cfg.run])
        if not data.exists():  # by hand: prepare the splits first, as the workflow's download job would
            run_download(p.downloads[p.splits[cfg.run]], data)
    out_dir = Path(args.out_dir) if args.out_dir else layout.study_run_dir(cfg.table, cfg.run)
    run_study_row(cfg, data, out_dir, run=_run_options(args))
    return 0


def _cmd_study_table(args) -> int:
    from ..stages.study_table import run_study_table

    cfg, _ = _settings(args, StudyTableStage, lambda p: p.render)
    out = layout.study_table(cfg.table)
    rows = [Path(r) for r in args.row] or [layout.study_run(cfg.table, run)["row"]
                                           for row in cfg.rows for run in row.runs]
    run_study_table(cfg, rows, Path(args.out or out["markdown"]), Path(args.json or out["json"]),
                    Path(args.csv or out["csv"]))
    return 0


def add_study_parsers(sub) -> Dict[str, argparse.ArgumentParser]:
    """``locallip study-row`` and ``locallip study-table``."""
    p = sub.add_parser("study-row", help="one run of a study table: train, calibrate, certify validation and test")
    p.add_argument("--study", help="the table (config/study/<table>.yaml), with --run")
    p.add_argument("--run", help="the run: a row's tag, or <tag>_seed<s> for a row with seeds")
    p.add_argument("--cfg-json", help="the run's settings, already composed (as the workflow passes them)")
    p.add_argument("--data", help="splits file (default results/study/<table>/data/<key>.npz, made if missing)")
    p.add_argument("--out-dir", help="directory of the run's files (default results/study/<table>/<run>/)")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    p.set_defaults(func=_cmd_study_row)
    t = sub.add_parser("study-table", help="a study's table (markdown, JSON, CSV) from its rows")
    t.add_argument("--study", help="the table (config/study/<table>.yaml)")
    t.add_argument("--cfg-json", help="the table's settings, already composed (as the workflow passes them)")
    t.add_argument("--row", action="append", default=[], help="a row file (repeatable; default: the layout's)")
    t.add_argument("--out", help="markdown (default results/study/<table>/table.md)")
    t.add_argument("--json", help="JSON (default results/study/<table>/table.json)")
    t.add_argument("--csv", help="CSV (default results/study/<table>/table.csv)")
    t.set_defaults(func=_cmd_study_table)
    return {"study-row": p, "study-table": t}
