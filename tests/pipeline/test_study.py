"""Study tables as pipeline targets (config/study/<table>.yaml, workflow/rules/study.smk): a two-row
study of the smoke experiments runs end to end through Snakemake in a copy of the project, its
table holds the rows' numbers, only a changed row reruns, and a malformed declaration is refused
in one line.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from locallip.foundation import layout
from locallip.foundation.study import study_names
from locallip.pipeline import study as study_jobs

from pipeline_helpers import (REPO, SMALL_DATA_OVERRIDES, SPEED_OVERRIDES, SMOKE, SMOKE_BASELINE, clone_project,
                              copy_project, env_for, mtimes, parse_dry_run, snakemake)

TABLE = "smoke_pair"
RADII = [0.1, 0.3]
DECLARATION = {
    "title": "Two smoke rows",
    "radii": RADII,
    # the smoke experiments on fewer points and iterations: the test is about the orchestration
    "overrides": [*SPEED_OVERRIDES, *SMALL_DATA_OVERRIDES, "dataset.test_size=60"],
    "rows": [{"tag": "ll", "experiment": SMOKE},
             {"tag": "gloro", "experiment": SMOKE_BASELINE, "overrides": ["train.epochs=2"]}],
}
TARGET = str(layout.study_table(TABLE)["markdown"])
#: bench/study.py's row fields: a row of the pipeline is read like one of its lines
BENCH_ROW_FIELDS = {"tag", "experiment", "overrides", "train_time_s", "epochs", "best_epoch", "bound", "loss",
                    "guarantee", "calibration_scales", "last_epoch", "test_points", "val", "test", "commit", "date"}


def declare(project: Path, doc: dict, name: str = TABLE) -> Path:
    path = project / "config" / "study" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def study_jobs_planned(project: Path, target: str = TARGET):
    """(rule, wildcards as a sorted tuple) of what `snakemake -n target` would run."""
    p = snakemake(project, "-n", "--cores", "1", target)
    text = p.stdout + p.stderr
    if "Nothing to be done" in text:
        return []
    return sorted((rule, tuple(sorted(wc.items()))) for rule, wc in parse_dry_run(text))


def expected_jobs(project: Path, runs):
    key = study_jobs.plan(TABLE, project / "config").splits
    keys = sorted({key[r] for r in runs})
    out = [("study_download", (("key", k), ("table", TABLE))) for k in keys]
    out += [("study_row", (("run", r), ("table", TABLE))) for r in runs]
    return sorted(out + [("study_table", (("table", TABLE),))])


@pytest.fixture(scope="module")
def declared(tmp_path_factory) -> Path:
    """A copy of the project with the two-row study declared, nothing run."""
    project = copy_project(tmp_path_factory.mktemp("study") / "project")
    declare(project, DECLARATION)
    return project


@pytest.fixture(scope="module")
def ran(declared, tmp_path_factory) -> Path:
    """The same copy after `snakemake --cores 2 results/study/smoke_pair/table.md`."""
    project = clone_project(declared, tmp_path_factory.mktemp("study-run") / "project")
    snakemake(project, "--cores", "2", TARGET, timeout=900)
    return project


def test_every_committed_declaration_composes():
    names = study_names(REPO / "config")
    assert "mnist5k_r158_equal_epochs" in names and "fmnist_e10" in names
    for name in names:
        p = study_jobs.plan(name, REPO / "config")
        assert p.runs and len(p.render.rows) == len(p.declaration.rows), name


def test_declarations_match_the_recorded_rows_and_the_docs():
    """The mnist5k declarations are the runs bench/study.py recorded (same experiment, same overrides), and
    those rows render (the row job's table code) exactly as docs/study.md prints them."""
    from locallip.foundation.study import load_study, study_file
    from locallip.stages.study_table import jsonl_tables

    recorded_file = REPO / "bench" / "results" / "study_runs_current.jsonl"
    recorded = {r["tag"]: r for r in map(json.loads, recorded_file.read_text().splitlines())}
    declared_names = [n for n in study_names(REPO / "config") if n.startswith("mnist5k_")]
    assert "mnist5k_r158_equal_epochs" in declared_names
    for name in declared_names:
        decl = load_study(study_file(REPO / "config", name))
        for row in decl.rows:
            assert row.tag in recorded, (name, row.tag)
            assert (row.experiment, [*decl.overrides, *row.overrides]) == (
                recorded[row.tag]["experiment"], recorded[row.tag]["overrides"]), (name, row.tag)
            assert [repr(float(r)) for r in decl.radii] == list(recorded[row.tag]["test"]), (name, row.tag)
    docs = (REPO / "docs" / "study.md").read_text()
    rendered = [ln for ln in jsonl_tables(recorded_file).splitlines() if ln.startswith("| ") and "| run |" not in ln]
    assert len(rendered) == len(recorded) and all(ln in docs for ln in rendered)


def test_dry_run_lists_exactly_the_study_jobs(declared):
    assert study_jobs_planned(declared) == expected_jobs(declared, ["ll", "gloro"])


def test_two_row_study_runs_end_to_end(ran):
    rows = {r: json.loads((ran / layout.study_run(TABLE, r)["row"]).read_text()) for r in ("ll", "gloro")}
    for tag, row in rows.items():
        assert BENCH_ROW_FIELDS <= set(row), BENCH_ROW_FIELDS - set(row)
        assert row["tag"] == tag and set(row["test"]) == {repr(r) for r in RADII}
        assert row["test_points"] == 60 and row["val_points"] == 40
    assert rows["gloro"]["epochs"] == 2 and rows["gloro"]["bound"] == "global" and rows["ll"]["bound"] == "local"
    assert rows["gloro"]["overrides"][-1] == "train.epochs=2"
    out = {k: ran / v for k, v in layout.study_table(TABLE).items()}
    lines = out["markdown"].read_text().splitlines()
    head = next(ln for ln in lines if ln.startswith("| run |"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[:4] == ["run", "experiment", "overrides", "train s"] and "audit broken" in cols
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")]
            for ln in lines if ln.startswith("| ") and ln != head}
    assert set(body) == {"ll", "gloro"}
    for tag, row in rows.items():
        cells = dict(zip(cols, body[tag]))
        for r in RADII:  # every number is the row file's
            assert cells[f"test cert {r}"] == f"{100 * row['test'][repr(r)]['local']:.1f}"
            assert cells[f"val cert {r}"] == f"{100 * row['val'][repr(r)]['local']:.1f}"
            assert cells[f"test global {r}"] == f"{100 * row['test'][repr(r)]['global']:.1f}"
        assert cells["test clean"] == f"{100 * row['test'][repr(RADII[0])]['clean']:.1f}"
        assert cells["train s"] == f"{row['train_time_s']:.0f}"
        assert cells["audit broken"] == str(sum(v["broken"] for s in ("val", "test") for v in row[s].values()))
    doc = json.loads(out["json"].read_text())
    assert [r["tag"] for r in doc["rows"]] == ["ll", "gloro"]
    for rec in doc["rows"]:
        assert rec["test_cert_0.3"] == rows[rec["tag"]]["test"]["0.3"]["local"]
        assert rec["train_s"] == rows[rec["tag"]]["train_time_s"]
    with open(out["csv"]) as f:
        flat = list(csv.DictReader(f))
    assert [r["tag"] for r in flat] == ["ll", "gloro"]
    assert float(flat[0]["test_cert_0.1"]) == rows["ll"]["test"]["0.1"]["local"]


def test_nothing_to_do_after_the_run(ran):
    assert study_jobs_planned(ran) == []


def test_a_changed_override_reruns_only_that_row(ran, tmp_path):
    project = clone_project(ran, tmp_path / "project")
    doc = json.loads(json.dumps(DECLARATION))
    doc["rows"][1]["overrides"] = ["train.epochs=1"]
    declare(project, doc)
    assert study_jobs_planned(project) == sorted([("study_row", (("run", "gloro"), ("table", TABLE))),
                                                  ("study_table", (("table", TABLE),))])
    before = mtimes([project / layout.study_run(TABLE, "ll")["row"], project / layout.study_run(TABLE, "ll")["model"]])
    snakemake(project, "--cores", "2", TARGET, timeout=600)
    assert mtimes([Path(p) for p in before]) == before  # the unchanged row was not touched
    row = json.loads((project / layout.study_run(TABLE, "gloro")["row"]).read_text())
    assert row["epochs"] == 1
    table = json.loads((project / layout.study_table(TABLE)["json"]).read_text())
    assert table["rows"][1]["overrides"][-1] == "train.epochs=1"


def test_a_seeded_row_has_one_job_per_seed(declared, tmp_path):
    project = clone_project(declared, tmp_path / "project")
    doc = json.loads(json.dumps(DECLARATION))
    doc["rows"][1]["seeds"] = [0, 1]
    declare(project, doc)
    assert study_jobs_planned(project) == expected_jobs(project, ["ll", "gloro_seed0", "gloro_seed1"])
    seeds = [study_jobs.plan(TABLE, project / "config").runs[f"gloro_seed{s}"].train.train.seed for s in (0, 1)]
    assert seeds == [0, 1]


BAD = [
    ({"rowz": []}, "rowz"),  # unknown key
    ({"columns": ["test_cert", "test_certt"]}, "test_certt"),  # not a column
    ({"radii": ["big"]}, "big"),  # wrong type
    ({"radii": [0.0]}, "radii"),  # out of range
    ({"test_limit": 0}, "test_limit"),
    ({"rows": [{"tag": "a", "experiment": "nope"}]}, "nope"),  # unknown experiment
    ({"rows": [{"tag": "a", "experiment": SMOKE, "overrides": ["train.epochz=3"]}]}, "epochz"),
    ({"rows": [{"tag": "a", "experiment": SMOKE}, {"tag": "a", "experiment": SMOKE_BASELINE}]}, "rows[1]"),
    ({"rows": [{"tag": "../x", "experiment": SMOKE}]}, "rows[0].tag"),
]


@pytest.mark.parametrize("change, field", BAD, ids=[b[1] for b in BAD])
def test_a_malformed_declaration_is_refused_in_one_line(declared, tmp_path, change, field):
    project = copy_project(tmp_path / "project", items=("config", "src"))
    declare(project, {**DECLARATION, **change}, "bad")
    p = subprocess.run([sys.executable, "-m", "locallip.pipeline.cli", "study-table", "--study", "bad"], cwd=project,
                       env=env_for(project), capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("locallip study-table: error: ") and "config/study/bad.yaml" in lines[0], lines[0]
    assert field in lines[0], lines[0]
    assert "\x1b" not in p.stderr


def test_a_malformed_declaration_fails_only_its_own_targets(declared, tmp_path):
    project = clone_project(declared, tmp_path / "project")
    declare(project, {**DECLARATION, "rows": [{"tag": "a", "experiment": SMOKE, "overrides": ["train.epochz=3"]}]},
            "bad")
    p = snakemake(project, "-n", "--cores", "1", str(layout.study_table("bad")["markdown"]), check=False)
    out = p.stdout + p.stderr
    message = [ln.strip() for ln in out.splitlines() if "locallip study error" in ln]
    assert p.returncode != 0 and len(message) == 1, out[-3000:]
    assert message[0].startswith("locallip study error: config/study/bad.yaml: rows[0] (a): ")
    assert "epochz" in message[0] and "caused by: ('study" not in message[0]
    assert study_jobs_planned(project) == expected_jobs(project, ["ll", "gloro"])  # the other table still plans
