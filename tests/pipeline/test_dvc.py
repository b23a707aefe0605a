"""The DVC pipeline: dvc.yaml / params.yaml generated from the same composition as the
Snakemake workflow, the same CLI commands on the same paths, data and checkpoints
versioned, metrics and plots, a default local remote -- and the two orchestrators
never redoing each other's work (both directions, on the smoke experiment, in
temporary git repositories).
"""
from __future__ import annotations

import configparser
import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

import sys

from locallip.foundation import layout as paths
from locallip.foundation.provenance import code_deps
from locallip.pipeline import dag
from locallip.pipeline.table import stage
from locallip.foundation.compose import compose, plain
from locallip.foundation.ranges import radius_tag
from locallip.pipeline.table import stage_config

from pipeline_helpers import (REPO, SMOKE, SMOKE_BASELINE, SPEED_OVERRIDES, clone_project, copy_project, dvc,
                              dvc_pipeline as run_orchestrate, git, job_keys, mtimes, new_radius, outputs_of,
                              planned_jobs, radii_override, smoke_cfg, smoke_config, smoke_project, smoke_radii,
                              snakemake)

import locallip.pipeline.dvc as orchestrate  # noqa: E402  (the DVC generator, from the stage table)

STAGES = ("download", "train", "calibrate", "certify", "radii", "export", "report")
META = orchestrate.META_KEY
MAIN = "mnist5k_r158"  # the default experiment (workflow/config/config.yaml)
RUNNING = re.compile(r"Running stage '([^']+)'")


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def ran_stages(output: str) -> list:
    return sorted(RUNNING.findall(output))


def init_git_dvc(project: Path, remote: Path) -> None:
    """A git repo (no commit needed for dvc repro) whose DVC remote is a temporary directory."""
    if not (project / ".git").exists():
        git(project, "init", "-q")
    # config.local overrides the default remote's url: tests never touch ~/.cache/locallip/dvc-remote
    dvc(project, "remote", "modify", "--local", "local", "url", str(remote))


# --------------------------------------------------------------------------- the committed files

@pytest.fixture(scope="module")
def dvc_doc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def params_doc() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_committed_dvc_files_match_the_composition(tmp_path):
    project = copy_project(tmp_path / "p")
    p = run_orchestrate(project, "dvc", "--check", check=False)
    assert p.returncode == 0, ("dvc.yaml/params.yaml are stale: run `python workflow/scripts/dvc_pipeline.py dvc`\n"
                               + p.stderr)
    # and the check does notice a stale file
    doc = yaml.safe_load((project / "params.yaml").read_text())
    doc[MAIN]["train"]["train"]["epochs"] += 1  # as if config/ had changed since
    (project / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert run_orchestrate(project, "dvc", "--check", check=False).returncode == 1


def test_dvc_stages_mirror_the_pipeline(dvc_doc, params_doc):
    cfgs = dag.compose_all(params_doc[META]["overrides"], params_doc[META]["experiment_overrides"])
    names = dag.with_baselines(params_doc[META]["experiments"], cfgs)
    assert names[0] == MAIN and {f"{MAIN}_gloro", f"{MAIN}_bcp"} <= set(names)
    stages = dvc_doc["stages"]
    radii = dag.certify_radii(cfgs, names)
    expected = set()
    for n in names:
        expected |= {f"{s}-{n}" for s in ("download", "train", "calibrate", "radii", "export", "report")}
        expected |= {orchestrate.stage_name("certify", n, r) for r in radii[n]}
    assert set(stages) == expected
    for n in names:
        dl, tr, ca, re_ = (stages[f"{s}-{n}"] for s in ("download", "train", "calibrate", "report"))
        for s, st in zip(("download", "train", "calibrate", "report"), (dl, tr, ca, re_)):
            assert st["cmd"].startswith(f"locallip {s} --cfg-file params.yaml --cfg-key {n}.{s} ")
            assert st["params"] == [f"{n}.{s}"]
            assert set(code_deps(stage(s).module)) <= set(st["deps"])
        # data and checkpoints are versioned (cached outs); metrics declared
        assert dl["outs"] == [str(paths.splits(n))]
        assert tr["outs"] == [str(paths.model(n))] and tr["metrics"] == [str(paths.train_metrics(n))]
        assert ca["outs"] == [str(paths.calibrated_model(n))] and ca["metrics"] == [str(paths.calibration(n))]
        assert str(paths.train_state(n)) in tr["cmd"] and str(paths.train_state(n)) not in json.dumps(tr["outs"])
        for r in radii[n]:
            ce = stages[orchestrate.stage_name("certify", n, r)]
            assert f"--radius {radius_tag(r)} " in ce["cmd"]
            assert ce["metrics"] == [str(paths.certificate(n, r))]
            assert ce["outs"] == [str(paths.certificate_table(n, r))]
            assert ce["params"] == [f"{n}.certify"]  # shared by every radius: a new radius reruns no other
        assert re_["outs"] == [str(paths.report(n))]
        assert len(re_["plots"]) == 5
        for b in cfgs[n].report.baselines:
            assert f"--baseline-dir {paths.experiment_dir(b)}" in re_["cmd"]
            for r in cfgs[n].certify.radii:
                assert str(paths.certificate(b, r)) in re_["deps"]
    plot_ids = [next(iter(p)) for p in dvc_doc["plots"]]
    assert f"training-{MAIN}" in plot_ids


def _argv(cmd: str) -> dict:
    """A stage command as {option: value}, config passing and shell plumbing left out."""
    words = shlex.split(cmd)
    words = words[words.index("locallip"):]
    if ">" in words:
        words = words[:words.index(">")]
    opts = {"command": words[1]}
    it = iter(words[2:])
    for w in it:
        opts[w] = next(it)
    for k in ("--cfg-json", "--cfg-file", "--cfg-key", "--threads"):  # --threads: the rule's CPU share
        opts.pop(k, None)
    return opts


def test_dvc_runs_the_same_commands_as_snakemake(tmp_path, dvc_doc):
    """Same CLI command, same flags, same paths, job by job (only how the config arrives differs)."""
    project = copy_project(tmp_path / "p")
    outs = [o if isinstance(o, str) else next(iter(o))  # an out with options is {path: {...}}
            for name, st in dvc_doc["stages"].items() if name.startswith("report-") for o in st["outs"]]
    reports = sorted(o for o in outs if o.endswith("/report.md"))
    assert f"results/{MAIN}/report.md" in reports
    p = snakemake(project, "-n", "-p", "--cores", "1", "--forceall", *reports)
    snake = {}
    for line in p.stdout.splitlines():
        if "locallip " in line and "--cfg-json" in line:
            opts = _argv(line.strip())
            cfg = json.loads(shlex.split(line.strip())[shlex.split(line.strip()).index("--cfg-json") + 1])
            name = cfg["config"]["name"] if opts["command"] == "report" else cfg["name"]
            snake[(opts["command"], name, opts.get("--radius"))] = opts
    dvc_cmds = {}
    for name, st in dvc_doc["stages"].items():
        opts = _argv(st["cmd"])
        key_name = shlex.split(st["cmd"])[shlex.split(st["cmd"]).index("--cfg-key") + 1].split(".")[0]
        dvc_cmds[(opts["command"], key_name, opts.get("--radius"))] = opts
    assert snake and snake == dvc_cmds


def test_params_are_exactly_what_snakemake_jobs_receive(params_doc):
    meta = params_doc[META]
    cfgs = dag.compose_all(meta["overrides"], meta["experiment_overrides"])
    for n, blocks in params_doc.items():
        if n == META:
            continue
        for stage in STAGES:
            radii = cfgs[n].certify.radii if stage == "certify" else [None]
            for r in radii:
                job = dag.job(cfgs, n, stage, r)
                sent = json.loads(dag.command(job, "json")[3])  # what a Snakemake job gets
                assert sent == job.params
                if stage != "report":  # the report's settings also carry the commands that rebuild it
                    assert sent == plain(stage_config(cfgs[n], stage, r))
                assert (dict(blocks[stage], radius=float(r)) if r is not None else blocks[stage]) == sent


def test_default_remote_is_local():
    cp = configparser.ConfigParser()
    cp.read(REPO / ".dvc" / "config")
    default = cp["core"]["remote"]
    url = cp[f"'remote \"{default}\"'"]["url"]
    assert default == "local"
    assert "://" not in url and (url.startswith("~") or url.startswith("/") or url.startswith(".")), url


def test_dvc_pipeline_refuses_to_record_unfinished_work(tmp_path):
    project = copy_project(tmp_path / "p")
    init_git_dvc(project, tmp_path / "remote")
    p = run_orchestrate(project, "commit", "-e", SMOKE, check=False)
    assert p.returncode == 1 and "snakemake still has work to do" in p.stderr
    assert not (project / "dvc.lock").exists()
    # and sync refuses while DVC's workspace does not match dvc.lock
    run_orchestrate(project, "dvc", "-e", SMOKE)
    p = run_orchestrate(project, "sync", check=False)
    assert p.returncode == 1 and "does not match dvc.lock" in p.stderr


def test_dag_connects_the_stages(tmp_path):
    project = copy_project(tmp_path / "p")
    init_git_dvc(project, tmp_path / "remote")
    dot = dvc(project, "dag", "--dot").stdout
    edges = set(re.findall(r'"([^"]+)" -> "([^"]+)"', dot))
    r = radius_tag(compose(MAIN).certify.radii[-1]).replace(".", "_")
    m = MAIN
    for a, b in [(f"download-{m}", f"train-{m}"), (f"train-{m}", f"calibrate-{m}"),
                 (f"calibrate-{m}", f"certify-{m}-{r}"), (f"certify-{m}-{r}", f"report-{m}"),
                 (f"certify-{m}_gloro-{r}", f"report-{m}"), (f"train-{m}_gloro", f"report-{m}"),
                 (f"certify-{m}_bcp-{r}", f"report-{m}")]:
        assert (a, b) in edges, (a, b, sorted(edges))
    assert (f"train-{m}", f"report-{m}") in edges  # the report reads the train metrics


# --------------------------------------------------------------------------- both orchestrators, for real

@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    """The smoke project after `snakemake`, then `python workflow/scripts/dvc_pipeline.py commit`:
    Snakemake's outputs recorded in dvc.lock (and in the DVC cache)."""
    base = tmp_path_factory.mktemp("dvc")
    project = clone_project(smoke_project(tmp_path_factory), base / "project")
    init_git_dvc(project, base / "remote")
    run_orchestrate(project, "commit")  # the copy's Snakemake config: smoke (+ speed overrides)
    return project


def test_after_snakemake_dvc_repro_does_nothing(dvc_repo):
    before = mtimes(outputs_of(dvc_repo, SMOKE) + outputs_of(dvc_repo, SMOKE_BASELINE))
    assert json.loads(dvc(dvc_repo, "status", "--json").stdout or "{}") == {}
    out = dvc(dvc_repo, "repro").stdout
    assert ran_stages(out) == [], out
    assert "didn't change, skipping" in out and f"'train-{SMOKE}'" in out
    assert mtimes(outputs_of(dvc_repo, SMOKE) + outputs_of(dvc_repo, SMOKE_BASELINE)) == before
    # ... and Snakemake still agrees that everything is done
    assert planned_jobs(dvc_repo, targets=()) == []


def test_lock_records_the_snakemake_outputs(dvc_repo):
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    st = lock["stages"][f"train-{SMOKE}"]
    model = next(o for o in st["outs"] if o["path"] == str(paths.model(SMOKE)))
    assert model["md5"] == md5(dvc_repo / paths.model(SMOKE))
    assert st["params"]["params.yaml"][f"{SMOKE}.train"] == dag.params_block(smoke_cfg(), "train")


def test_metrics_and_plots(dvc_repo, tmp_path):
    metrics = json.loads(dvc(dvc_repo, "metrics", "show", "--json").stdout)
    flat = json.dumps(metrics)
    for r in smoke_radii(SMOKE):
        assert str(paths.certificate(SMOKE, r)) in flat
    assert "certified_acc_local" in flat and str(paths.train_metrics(SMOKE)) in flat
    out = tmp_path / "plots"
    dvc(dvc_repo, "plots", "show", "-o", str(out))
    html = (out / "index.html").read_text()
    assert f"training-{SMOKE}" in html and "certified_vs_radius" in html


def test_new_radius_in_dvc_then_snakemake_has_nothing_to_do(dvc_repo, tmp_path):
    project = clone_project(dvc_repo, tmp_path / "p")
    trained = mtimes([project / paths.model(SMOKE), project / paths.model(SMOKE_BASELINE)])
    r = new_radius()
    new = {SMOKE: [radii_override(smoke_radii(SMOKE) + [r])]}
    settings = {"experiments": [SMOKE], "overrides": SPEED_OVERRIDES, "experiment_overrides": new}
    (project / "radius.yaml").write_text(yaml.safe_dump(settings))
    run_orchestrate(project, "dvc", "--configfile", "radius.yaml")
    out = dvc(project, "repro").stdout
    assert ran_stages(out) == sorted([orchestrate.stage_name("certify", SMOKE, r),
                                      orchestrate.stage_name("certify", SMOKE_BASELINE, r), f"export-{SMOKE}",
                                      f"report-{SMOKE}"])
    assert mtimes([project / paths.model(SMOKE), project / paths.model(SMOKE_BASELINE)]) == trained
    made = {str(f): md5(f) for f in outputs_of(project, SMOKE) + outputs_of(project, SMOKE_BASELINE)}
    assert str(project / paths.certificate(SMOKE, r)) in made
    # Snakemake adopts what DVC made (without sync, the report's recorded params are stale)
    stale = planned_jobs(project, targets=(), config=smoke_config(experiment_overrides=new))
    assert ("report", SMOKE) in job_keys(stale)
    run_orchestrate(project, "sync")
    assert planned_jobs(project, targets=(), config=smoke_config(experiment_overrides=new)) == []
    # sync changed no file: Snakemake keeps DVC's results
    assert {str(f): md5(f) for f in outputs_of(project, SMOKE) + outputs_of(project, SMOKE_BASELINE)} == made
    assert json.loads(dvc(project, "status", "--json").stdout or "{}") == {}


def test_forced_download_is_byte_identical(dvc_repo, tmp_path):
    """Re-running download through DVC reproduces splits.npz exactly: nothing downstream goes stale."""
    project = clone_project(dvc_repo, tmp_path / "p")
    before = md5(project / paths.splits(SMOKE))
    out = dvc(project, "repro", "--force", "--single-item", f"download-{SMOKE}").stdout
    assert ran_stages(out) == [f"download-{SMOKE}"]
    assert md5(project / paths.splits(SMOKE)) == before
    assert json.loads(dvc(project, "status", "--json").stdout or "{}") == {}


def test_push_clone_pull_then_snakemake_has_nothing_to_do(dvc_repo, tmp_path):
    origin = clone_project(dvc_repo, tmp_path / "origin")
    remote = tmp_path / "remote"
    dvc(origin, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(origin, "push")
    git(origin, "add", "-A")
    git(origin, "commit", "-q", "-m", "smoke results")
    tracked = git(origin, "ls-files").stdout.split()
    assert "dvc.lock" in tracked and "params.yaml" in tracked and not any(t.startswith("results/") for t in tracked)

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert not (clone / "results").exists() and not (clone / ".snakemake").exists()
    dvc(clone, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(clone, "pull")
    for f in outputs_of(origin, SMOKE) + outputs_of(origin, SMOKE_BASELINE):
        rel = f.relative_to(origin)
        assert md5(clone / rel) == md5(f), rel
    run_orchestrate(clone, "sync")  # the documented one-liner after a pull
    assert planned_jobs(clone, targets=()) == []
    for f in outputs_of(origin, SMOKE):
        assert md5(clone / f.relative_to(origin)) == md5(f)  # sync only marks, never rewrites
    # Snakemake now holds metadata: a real change is still noticed
    jobs = planned_jobs(clone, targets=(), config=smoke_config(experiment_overrides={SMOKE: ["train.lr=0.002"]}))
    assert ("train", SMOKE) in job_keys(jobs) and ("train", SMOKE_BASELINE) not in job_keys(jobs)
    assert json.loads(dvc(clone, "status", "--json").stdout or "{}") == {}
