"""The Local-Lip vs GloRo training study by hand: one configuration per run (a thin wrapper).

The study's tables are pipeline targets now (``config/study/<table>.yaml``;
``snakemake --cores N results/study/<table>/table.md``, docs/study.md). This runner keeps the
old way of adding one run by hand: it runs the same row job (``locallip.stages.study``:
train, calibrate, certification of the *validation* and *test* splits at the experiment's
radii) under ``bench/out/study/<tag>/`` and appends its row as one JSON line to ``--out``
(default ``bench/out/study/runs.jsonl``).

    python -m bench.study --tag lanczos8 -e mnist5k train.solver_steps=8
    python -m bench.study --tag gloro_eqtime -e mnist5k_gloro train.epochs=150 train.ramp_epochs=75
    python -m bench.study --table                 # markdown table of every recorded run

Settings are chosen on validation certified accuracy; the test columns are
reported, never used to choose. Runs take one torch thread by default.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

from bench._common import WORK_DIR  # noqa: F401 (sys.path set up there)

STUDY_DIR = WORK_DIR / "study"


def run_one(tag: str, experiment: str, overrides: List[str], out: Path, threads: int,
            test_limit: int = 0) -> dict:
    from locallip.foundation.compose import compose
    from locallip.foundation.schema import RunConfig
    from locallip.foundation.study import StudyDeclaration, StudyRow
    from locallip.pipeline.study import plan_declaration
    from locallip.stages.download import run_download
    from locallip.stages.study import run_study_row

    radii = [float(r) for r in compose(experiment, list(overrides)).certify.radii]
    decl = StudyDeclaration(radii=radii, test_limit=test_limit or None,
                            rows=[StudyRow(tag=tag, experiment=experiment, overrides=list(overrides))])
    p = plan_declaration("bench", decl, where="bench.study")
    key = p.splits[tag]
    splits = STUDY_DIR / "data" / f"{key}.npz"
    if not splits.exists():
        run_download(p.downloads[key], splits)
    row = run_study_row(p.runs[tag], splits, STUDY_DIR / tag, run=RunConfig(progress=False, threads=threads))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table(path: Path) -> str:
    """Markdown tables of every recorded run, one per set of certification radii."""
    from locallip.stages.study_table import jsonl_tables

    return jsonl_tables(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("-e", "--experiment", default="mnist5k")
    p.add_argument("--tag")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=STUDY_DIR / "runs.jsonl")
    p.add_argument("--test-limit", type=int, default=0, help="certify only the first N test points (0 = all)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    a = p.parse_args()
    if a.table:
        print(table(a.out))
        return
    tag = a.tag or "_".join([a.experiment] + [o.replace("train.", "").replace("model.", "") for o in a.overrides])
    row = run_one(tag, a.experiment, a.overrides, a.out, a.threads, a.test_limit)
    print(json.dumps({k: row[k] for k in ("tag", "train_time_s", "val", "test")}, indent=1))


if __name__ == "__main__":
    main()
