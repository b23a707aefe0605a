"""The stage table is the one list of stages: a stage added there (one entry and one module) appears
in the CLI, in the Snakemake workflow and in dvc.yaml, with nothing else edited. What a stage does
differently is a field of its entry: the orchestration never tests a stage's name."""
from __future__ import annotations

import ast
import dataclasses
import json
import re
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
          inputs=lambda s: {"data": [str(layout.splits(s.name))]}, options=lambda s: {"notes": []},
          flags={"data": "--data", "out": "--out", "notes": "--note"}, repeated_flags=("notes",),
          enabled=lambda cfg: bool(cfg.report.baselines), run_for_baselines=True,
          dvc_plots=lambda n, out: [{f"sizes-{n}": {"title": f"{n}: split sizes", "y": {out["out"]: ["sizes"]}}}],
          local=True, dvc={"out": "metrics"}),
'''
MODULE = '''"""A stage added through the table: the number of examples of every split."""
import json
from pathlib import Path

from ..data.splits import load_splits
from ..foundation.files import write_text
from ..foundation.schema import DownloadStage, RunConfig


def run_summary(cfg: DownloadStage, data: Path, out: Path, notes=(), run: RunConfig = RunConfig()) -> dict:
    sizes = load_splits(Path(data)).meta["sizes"]
    write_text(out, json.dumps({"experiment": cfg.name, "sizes": sizes, "notes": [str(n) for n in notes]}))
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
        settings = s.settings(_cfgs(), "smoke", 0.1)
        assert set(s.flags) <= set(s.outputs("x", 0.1)) | set(s.inputs(settings)) | set(s.options(settings)), s.name
        assert s.experiment(settings) == "smoke", s.name
        # a repeated flag is an option holding a list of paths
        assert all(isinstance(s.options(settings).get(k), list) for k in s.repeated_flags), s.name


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
         "--out", str(out), "--note", "a.txt", "--note", "b.txt")
    written = json.loads(out.read_text())
    assert written["sizes"]["test"] == 100
    assert written["notes"] == ["a.txt", "b.txt"]  # its repeated flag gives a list


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
    # the baseline turns it off itself, but smoke's report shows it, so it runs it too
    assert "summary-smoke_gloro" in doc["stages"]
    assert {"sizes-smoke": {"title": "smoke: split sizes", "y": {"results/smoke/summary.json": ["sizes"]}}} \
        in doc["plots"]


# --------------------------------------------------------------------------- no special case keyed on a name

RENAMED = "_renamed"


def _rename_every_stage(monkeypatch) -> None:
    """The stage table with every stage renamed, in every module that reads it."""
    from locallip.pipeline import cli, dag, dvc, table

    renamed = tuple(dataclasses.replace(s, name=s.name + RENAMED) for s in table.STAGES)
    monkeypatch.setattr(table, "BY_NAME", {s.name: s for s in renamed})
    monkeypatch.setattr(table, "NAMES", tuple(s.name for s in renamed))
    for module in (table, dag, dvc, cli):
        monkeypatch.setattr(module, "STAGES", renamed)


def test_the_pipeline_does_not_depend_on_the_stages_names(monkeypatch):
    """dvc.yaml and params.yaml (the jobs, their commands, plots and the report's "how to reproduce")
    are the same with every stage renamed, but for the names."""
    from locallip.foundation.compose import compose
    from locallip.pipeline import dvc

    # The baseline turns its radii off: smoke's report, which shows it, still needs them.
    cfgs = {"smoke": compose("smoke", config_dir=REPO / "config"),
            "smoke_gloro": compose("smoke_gloro", ["curve.enabled=false"], config_dir=REPO / "config")}
    names = ["smoke", "smoke_gloro"]
    settings = {"experiments": ["smoke"], "overrides": [], "experiment_overrides": {}}

    def files():
        return dvc._dump(dvc.pipeline(cfgs, names)), dvc._dump(dvc.params(cfgs, names, settings))

    pipeline, params = files()
    assert RENAMED not in pipeline + params
    assert "radii-smoke_gloro:" in pipeline and "training-smoke:" in pipeline
    assert "- locallip train experiment=smoke" in params  # the report's "how to reproduce"
    _rename_every_stage(monkeypatch)
    renamed_pipeline, renamed_params = files()
    assert f"radii{RENAMED}-smoke_gloro:" in renamed_pipeline
    assert renamed_pipeline.replace(RENAMED, "") == pipeline
    assert renamed_params.replace(RENAMED, "") == params


_NAME_LIKE = ("name", "stage", "command")  # identifiers that hold a stage's name


def _names_a_stage(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value in NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_stage(e) for e in node.elts)
    return False


def _holds_a_name(node: ast.AST) -> bool:
    ident = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
    return ident.lower().endswith(_NAME_LIKE)


def stage_name_tests(source: str):
    """(line, code) of each comparison of a stage's name with a literal naming a stage."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_holds_a_name(s) for s in sides) and any(_names_a_stage(s) for s in sides):
                yield node.lineno, ast.unparse(node)


def test_the_name_check_finds_special_cases():
    found = [code for source in ('if s.name == "radii": pass', 'x = j.stage != "train"',
                                 'y = "report" == stage_name', 'z = args.command in ("export", "other")')
             for _, code in stage_name_tests(source)]
    assert len(found) == 4, found
    assert not list(stage_name_tests('a = s.name == "radius"; b = key == "report"; c = s.per_radius'))


PIPELINE = REPO / "src" / "locallip" / "pipeline"


@pytest.mark.parametrize("path", sorted(PIPELINE.glob("*.py")), ids=lambda p: p.name)
def test_the_orchestration_never_compares_a_stage_name(path):
    """A stage that behaves differently says so in a field of its table entry."""
    found = list(stage_name_tests(path.read_text()))
    assert not found, f"{path.relative_to(REPO)}: {found}"


RULE_FILES = sorted([REPO / "workflow" / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")])


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_the_snakemake_rules_never_compare_a_stage_name(path):
    """The same for the rules (Snakemake's syntax is not Python's: a pattern instead of the parse)."""
    literal = "|".join(NAMES)
    name = r"\w*(?:name|stage)\b"
    pattern = re.compile(rf"{name}\s*(?:[!=]=|\bin\b)\s*[([{{]?\s*['\"](?:{literal})['\"]"
                         rf"|['\"](?:{literal})['\"]\s*(?:[!=]=)\s*{name}")
    found = [line.strip() for line in path.read_text().splitlines() if pattern.search(line)]
    assert not found, f"{path.relative_to(REPO)}: {found}"
