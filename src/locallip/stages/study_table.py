"""A study table from its rows: markdown (the tables of docs/study.md), JSON and CSV.

Every number comes from a row file (``stages.study``). A row declared with several seeds shows the
mean of its runs and, beside it, the standard error (sample standard deviation / sqrt(n)).
The rows ``bench/study.py`` recorded (one JSON line each) render the same way (``jsonl_tables``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..foundation.files import csv_text, read_json, write_json, write_text
from ..foundation.schema import RunConfig
from ..foundation.study import StudyColumn, StudyTableRow, StudyTableStage

PER_RADIUS = {"val_cert": ("val", "local"), "val_global": ("val", "global"), "test_cert": ("test", "local"),
              "test_global": ("test", "global")}
HEADS = {"train_s": "train s", "val_cert": "val cert", "val_global": "val global", "test_cert": "test cert",
         "test_global": "test global", "val_clean": "val clean", "test_clean": "test clean",
         "fixed": "fixed % (last epoch)", "train_converged": "train/converged", "audit_broken": "audit broken"}
#: bench/study.py's table (the tables of docs/study.md before the study ran through the pipeline).
BENCH_COLUMNS = [StudyColumn(c) for c in ("train_s", "val_cert", "test_cert", "test_global", "test_clean", "fixed",
                                          "train_converged")]


def _key(radius: float) -> str:
    return repr(float(radius))


def _values(column: str, radius: Optional[float], row: dict):
    """The value(s) of one column in one run's row: a number, a per-layer list, or None."""
    first = _key(row["_radii"][0])
    if column in PER_RADIUS:
        split, which = PER_RADIUS[column]
        return row[split][_key(radius)][which]
    if column in ("val_clean", "test_clean"):
        return row[column.split("_")[0]][first]["clean"]
    if column == "train_s":
        return row["train_time_s"]
    last = row.get("last_epoch") or {}
    if column == "fixed":
        return last.get("fixed_per_layer_val") or last.get("fixed_per_layer") or None
    if column == "train_converged":
        return last.get("bound_ratio_median")
    if column == "audit_broken":
        return sum(v["broken"] for split in ("val", "test") for v in row[split].values())
    raise ValueError(f"unknown study column {column!r}")


def _mean_se(xs: Sequence[float]):
    n = len(xs)
    mean = sum(xs) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
    return mean, se


def _cell_names(cfg: StudyTableStage) -> List[tuple]:
    """(column, radius or None, header) of every cell after run, experiment and overrides."""
    out = []
    for c in map(str, cfg.columns):
        radii = cfg.radii if c in PER_RADIUS else [None]
        out += [(c, r, HEADS[c] + ("" if r is None else f" {_key(r)}")) for r in radii]
    return out


def record(cfg: StudyTableStage, table_row: StudyTableRow, runs: Dict[str, dict]) -> dict:
    """One declared row, over its runs: every cell's mean (and standard error where it has seeds)."""
    rows = [runs[r] for r in table_row.runs]
    first = rows[0]
    out = {"tag": table_row.tag, "experiment": first["experiment"], "overrides": list(first["overrides"]),
           "runs": list(table_row.runs), "seeds": [r.get("seed") for r in rows if r.get("seed") is not None],
           "test_points": first.get("test_points")}
    for column, radius, head in _cell_names(cfg):
        key = column if radius is None else f"{column}_{_key(radius)}"
        values = [_values(column, radius, r) for r in rows]
        if any(v is None for v in values):
            out[key] = None
        elif isinstance(values[0], list):  # per layer: the mean of each layer
            out[key] = [sum(layer) / len(layer) for layer in zip(*values)]
        elif column == "audit_broken":
            out[key] = int(sum(values))
        else:
            out[key], se = _mean_se(values)
            if len(values) > 1:
                out[f"{key}_se"] = se
    return out


def _fmt(column: str, value, se) -> str:
    if value is None:
        return "—"
    if column == "fixed":
        return "/".join(f"{100 * f:.0f}" for f in value)
    if column == "audit_broken":
        return str(value)
    if column == "train_s":
        text, scale, digits = f"{value:.0f}", 1, 0
    elif column == "train_converged":
        text, scale, digits = f"{value:.3f}", 1, 3
    else:
        text, scale, digits = f"{100 * value:.1f}", 100, 1
    return text if se is None else f"{text} ± {scale * se:.{digits}f}"


def markdown(cfg: StudyTableStage, records: List[dict]) -> str:
    cells = _cell_names(cfg)
    head = ["run", "experiment", "overrides"] + [h for _, _, h in cells]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in records:
        tag = rec["tag"] + (f" ({len(rec['seeds'])} seeds)" if len(rec["runs"]) > 1 else "")
        row = [tag, rec["experiment"], " ".join(rec["overrides"]) or "(defaults)"]
        for column, radius, _ in cells:
            key = column if radius is None else f"{column}_{_key(radius)}"
            row.append(_fmt(column, rec[key], rec.get(f"{key}_se")))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _load_rows(cfg: StudyTableStage, paths: Sequence[Path]) -> Dict[str, dict]:
    """Every run's row, keyed by run, checked to belong to this table and to hold its radii."""
    runs = {}
    for p in paths:
        row = read_json(p)
        if not isinstance(row, dict) or "run" not in row or "test" not in row:
            raise ValueError(f"{p} is not a study row (no 'run' or 'test')")
        missing = [_key(r) for r in cfg.radii if _key(r) not in row["test"] or _key(r) not in row["val"]]
        if missing:
            raise ValueError(f"{p} holds no certificate at radius {', '.join(missing)} (rerun its row)")
        runs[row["run"]] = dict(row, _radii=list(cfg.radii))
    wanted = [r for tr in cfg.rows for r in tr.runs]
    absent = [r for r in wanted if r not in runs]
    if absent:
        raise ValueError(f"study {cfg.table}: no row file for run(s) {', '.join(absent)}")
    return runs


def _csv_cell(key: str, value):
    """Per-layer numbers joined by '/' (as the markdown shows them), overrides, runs and seeds by spaces."""
    if not isinstance(value, list):
        return value
    return ("/" if key == "fixed" else " ").join(map(str, value))


def run_study_table(cfg: StudyTableStage, rows: Sequence[Path], out: Path, json_out: Path, csv_out: Path,
                    run: RunConfig = RunConfig()) -> dict:
    """Write the table of ``cfg`` from the row files ``rows``: markdown, JSON and CSV."""
    runs = _load_rows(cfg, rows)
    records = [record(cfg, tr, runs) for tr in cfg.rows]
    text = (f"# {cfg.title or cfg.table}\n\n" + (f"{cfg.description.strip()}\n\n" if cfg.description else "")
            + markdown(cfg, records) + "\n")
    doc = {"table": cfg.table, "title": cfg.title, "radii": list(cfg.radii), "columns": [str(c) for c in cfg.columns],
           "rows": records}
    flat = [{k: _csv_cell(k, v) for k, v in r.items()} for r in records]
    write_json(json_out, doc)
    write_text(csv_out, csv_text(flat))
    write_text(out, text)
    print(f"[study-table] {cfg.table}: {len(records)} rows -> {out}")
    return doc


def jsonl_tables(path: Path) -> str:
    """bench/study.py's table of every recorded row (one per set of radii), as it printed it."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        return "(no runs)"
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r["test"].keys()), []).append(r)
    out = []
    for keys, group in groups.items():
        cfg = StudyTableStage(table="bench", radii=[float(k) for k in keys], columns=BENCH_COLUMNS,
                              rows=[StudyTableRow(tag=r["tag"], runs=[str(i)]) for i, r in enumerate(group)])
        runs = {str(i): dict(r, _radii=cfg.radii) for i, r in enumerate(group)}
        out.append(markdown(cfg, [record(cfg, tr, runs) for tr in cfg.rows]))
    return "\n\n".join(out)
