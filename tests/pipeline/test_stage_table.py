"""The stage table is the one list of stages: a stage added there (one entry and one module) appears
in the CLI, in the Snakemake workflow and in dvc.yaml, with nothing else edited."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from locallip.pipeline.table import NAMES, STAGES

REPO = Path(__file__).resolve().parents[2]

ENTRY = '''
    Stage("summary", "stages.summary", "run_summary", DownloadStage, "count the examples of every split",
          lambda cfgs, n, r: DownloadStage(name=n, dataset=cfgs[n].dataset),
          outputs=lambda n, r: {"out": str(layout.experiment_dir(n) / "summary.json")},
          inputs=lambda s: {"data": [str(layout.splits(s.name))]}, flags={"data": "--data", "out": "--out"},
          local=True, dvc={"out": "metrics"}),
'''
MODULE = '''"""A stage added through the table: the number of examples of every split."""
import json
from pathlib import Path

from ..data.splits import load_splits
from ..foundation.files import write_text
from ..foundation.schema import DownloadStage, RunConfig


def run_summary(cfg: DownloadStage, data: Path, out: Path, run: RunConfig = RunConfig()) -> dict:
    sizes = load_splits(Path(data)).meta["sizes"]
    write_text(out, json.dumps({"experiment": cfg.name, "sizes": sizes}))
    return sizes
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project with one more stage: an entry in the table and its module."""
    root = tmp_path_factory.mktemp("table") / "project"
    for part in ("src", "config", "workflow", "Snakefile"):
        src = REPO / part
        (shutil.copytree(src, root / part, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, root / part))
    table = root / "src" / "locallip" / "pipeline" / "table.py"
    text = table.read_text()
    assert "\n)\n\nBY_NAME" in text
    table.write_text(text.replace("\n)\n\nBY_NAME", ENTRY.rstrip("\n") + "\n)\n\nBY_NAME", 1))
    (root / "src" / "locallip" / "stages" / "summary.py").write_text(MODULE)
    return root


def _run(project: Path, *argv, check=True):
    env = dict(os.environ, PYTHONPATH=str(project / "src"))
    p = subprocess.run(list(argv), cwd=project, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(p.stdout[-3000:] + p.stderr[-3000:])
    return p


def test_the_table_holds_every_stage_once():
    assert NAMES == ("download", "train", "calibrate", "certify", "radii", "export", "report")
    assert len({s.module for s in STAGES}) == len(STAGES)
    for s in STAGES:
        assert set(s.flags) <= set(s.outputs("x", 0.1)) | set(s.inputs(s.settings(_cfgs(), "smoke", 0.1)))\
            | set(s.options(s.settings(_cfgs(), "smoke", 0.1))), s.name


def _cfgs():
    from locallip.foundation.compose import compose

    return {"smoke": compose("smoke", config_dir=REPO / "config"),
            "smoke_gloro": compose("smoke_gloro", config_dir=REPO / "config")}


def test_a_stage_added_to_the_table_is_in_the_cli(project, tmp_path):
    p = _run(project, sys.executable, "-m", "locallip.pipeline.cli", "--help")
    assert "summary" in p.stdout and "count the examples of every split" in p.stdout
    p = _run(project, sys.executable, "-m", "locallip.pipeline.cli", "summary", "--help")
    assert "--data" in p.stdout and "--out" in p.stdout
    # and it runs: download the smoke splits, then the new stage on them
    data, out = tmp_path / "splits.npz", tmp_path / "summary.json"
    _run(project, sys.executable, "-m", "locallip.pipeline.cli", "download", "experiment=smoke", "--out", str(data))
    _run(project, sys.executable, "-m", "locallip.pipeline.cli", "summary", "experiment=smoke", "--data", str(data),
         "--out", str(out))
    assert json.loads(out.read_text())["sizes"]["test"] == 100


def test_a_stage_added_to_the_table_is_in_the_snakemake_workflow(project):
    p = _run(project, sys.executable, "-m", "snakemake", "-n", "--cores", "1", "results/smoke/summary.json")
    assert "rule summary:" in p.stdout
    assert "results/smoke/summary.json" in p.stdout and "results/smoke/data/splits.npz" in p.stdout


def test_a_stage_added_to_the_table_is_in_dvc_yaml(project):
    import yaml

    _run(project, sys.executable, "-m", "locallip.pipeline.dvc", "dvc", "-e", "smoke")
    doc = yaml.safe_load((project / "dvc.yaml").read_text())
    entry = doc["stages"]["summary-smoke"]
    assert entry["cmd"].startswith("locallip summary --cfg-file params.yaml --cfg-key smoke.summary")
    assert "results/smoke/data/splits.npz" in entry["deps"] and entry["metrics"] == ["results/smoke/summary.json"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["smoke"]["summary"]["name"] == "smoke"
