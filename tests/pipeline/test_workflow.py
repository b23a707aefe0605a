"""The Snakemake workflow: layout, lint, targets, resources, conda envs, configuration
composed once at parse time, and -- after one real run of the smoke experiment --
that only what changed reruns.

Dry runs read the job list Snakemake prints (rule + wildcards of every job); the
real run is shared by the whole test session (``pipeline_helpers.smoke_project``).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from locallip.foundation import layout as paths
from locallip.foundation.provenance import code_deps
from locallip.pipeline import dag
from locallip.pipeline.table import stage
from locallip.foundation.compose import compose, experiment_names, plain
from locallip.foundation.ranges import radius_tag
from locallip.pipeline.table import stage_config

from pipeline_helpers import (REPO, SMOKE, SMOKE_BASELINE, SPEED_OVERRIDES, clone_project, copy_project,
                              inspect_workflow, job_keys, mtimes, new_radius, outputs_of, planned_jobs,
                              radii_override, smoke_config, smoke_project, smoke_radii, snakemake, touch_later)

STAGES = ("download", "train", "calibrate", "certify", "radii", "export", "report")
RULE_FILES = ("common", "stages", "external")  # the rules come from the stage table, in a loop
DEFAULT_EXPERIMENTS = ["mnist5k_r158"]
GPU_RULES = ("train", "calibrate", "certify", "radii")
LOCAL_RULES = ("download", "export", "report")


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A pristine copy of the project (no results): for dry runs that change nothing."""
    return copy_project(tmp_path_factory.mktemp("workflow") / "project")


@pytest.fixture(scope="module")
def rules(project) -> dict:
    return inspect_workflow(project)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """The project after a real `snakemake` run of smoke + smoke_gloro (built once per session)."""
    return smoke_project(tmp_path_factory)


def expected_jobs(cfgs: dict, names):
    """(rule, experiment[, radius]) of every job needed for the reports of ``names`` from scratch
    (a report links its systems' model exports, so those are built too)."""
    names = dag.with_baselines(names, cfgs)
    radii = dag.certify_radii(cfgs, names)
    keys = []
    for n in names:
        keys += [("download", n), ("train", n), ("calibrate", n), ("radii", n), ("export", n), ("report", n)]
        keys += [("certify", n, radius_tag(r)) for r in radii[n]]
    return sorted(keys)


# --------------------------------------------------------------------------- layout and lint

def test_standard_layout_and_thin_entry_point():
    top = (REPO / "Snakefile").read_text()
    code = [ln for ln in top.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert code[0] == 'include: "workflow/Snakefile"'
    assert "shell:" not in top and "locallip" not in top  # no stage logic at the top level
    for name in RULE_FILES:
        assert (REPO / "workflow" / "rules" / f"{name}.smk").is_file()
    main = (REPO / "workflow" / "Snakefile").read_text()
    for name in RULE_FILES:
        assert f'include: "rules/{name}.smk"' in main
    # every stage's rule is made from the table, in one loop: no stage is named in the rules
    loop = (REPO / "workflow" / "rules" / "stages.smk").read_text()
    assert "for _stage in STAGES:" in loop and not any(f'"{s}"' in loop for s in STAGES)
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert {"experiments", "overrides"} <= set(schema["properties"])
    profile = yaml.safe_load((REPO / "workflow" / "profiles" / "default" / "config.yaml").read_text())
    assert isinstance(profile, dict) and profile


def test_lint_is_clean(project):
    p = snakemake(project, "--lint", check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_profile_and_workflow_snakefile(project):
    """The local profile is usable, and workflow/Snakefile works on its own. Both Snakefiles pick up
    profiles/default by itself (rerun-incomplete: the README's command works after an interruption)."""
    p = snakemake(project, "-n", "--profile", "workflow/profiles/default")
    assert "Using profiles workflow/profiles/default and workflow specific profile profiles/default" in (
        p.stdout + p.stderr)
    p = snakemake(project, "-n", "-s", "workflow/Snakefile")
    out = p.stdout + p.stderr
    assert "workflow specific profile profiles/default" in out
    assert yaml.safe_load((REPO / "profiles" / "default" / "config.yaml").read_text()) == {"rerun-incomplete": True}
    assert "report" in out and "mnist5k" in out


def test_rules_only_call_the_cli(rules):
    """A rule's shell is the command the dag gives (tracked as a param) plus threads and the log."""
    for stage in STAGES:
        shell = rules["rules"][stage]["shell"]
        assert shell.startswith("{params.cmd}") or shell.startswith("OMP_NUM_THREADS={threads} {params.cmd}"), shell
        assert "config[" not in shell and "&&" not in shell and ";" not in shell, shell
        assert "cmd" in rules["rules"][stage]["params"]
    cfgs = dag.compose_all(names=[SMOKE, SMOKE_BASELINE])
    for stage in STAGES:
        j = dag.job(cfgs, SMOKE, stage, 0.1 if stage == "certify" else None)
        argv = dag.command(j, "json")
        assert argv[:3] == ["locallip", stage, "--cfg-json"] and json.loads(argv[3]) == j.params


def test_each_stage_depends_on_its_own_module_and_the_core_it_uses():
    src = "src/locallip/"
    deps = {s: set(code_deps(stage(s).module)) for s in STAGES}
    mods = lambda *names: {f"{src}{n}.py" for n in names}  # noqa: E731
    core = mods("nn/activations", "nn/models", "bounds/localbound", "bounds/spectral", "bounds/krylov",
                "certify/cascade")
    assert core | mods("losses", "training", "stages/train", "data/splits") <= deps["train"]
    assert core | mods("stages/calibrate", "data/splits") <= deps["calibrate"]
    assert core | mods("attack", "certify/split", "stages/certify", "data/splits") <= deps["certify"]
    assert not mods("stages/train", "losses", "training") & deps["certify"]  # certify: no rerun for training code
    assert not mods("data/sources") & deps["train"]  # nor train for dataset loaders
    assert {d for d in deps["report"] if "/stages/report/" not in d} == mods("stages/__init__")
    assert mods("data/sources", "stages/download") <= deps["download"] and not core & deps["download"]
    for s in STAGES:  # the foundation and the orchestration (CLI, config, layout, files) rerun nothing
        assert not any("/pipeline/" in d or "/foundation/" in d for d in deps[s]), s
        assert all((REPO / f).is_file() for f in deps[s])


def test_gpu_resources_and_local_rules(rules):
    r = rules["rules"]
    for name in GPU_RULES:
        res = r[name]["resources"]
        assert res.get("gpu") == 1, (name, res)
        assert isinstance(res.get("mem_mb"), int) and res["mem_mb"] > 0, (name, res)
        assert isinstance(res.get("runtime"), int) and res["runtime"] > 0, (name, res)
        assert isinstance(res.get("_cores"), int) and res["_cores"] >= 1, (name, res)
        assert not r[name]["local"], name
    for name in LOCAL_RULES:
        assert r[name]["local"], name
        assert "gpu" not in r[name]["resources"], name


def test_conda_envs_exist_and_name_the_packages(rules):
    needed = {"torch", "torchvision", "numpy", "hydra-core", "mlxtend", "matplotlib", "tqdm"}
    for name in STAGES:
        env_file = rules["rules"][name]["conda"]
        assert env_file, f"rule {name} has no conda: env"
        env = yaml.safe_load(Path(env_file).read_text())
        assert isinstance(env, dict) and env.get("dependencies"), env_file
        names = set()
        for dep in env["dependencies"]:
            items = dep["pip"] if isinstance(dep, dict) else [dep]
            for item in items:
                m = re.match(r"\s*([A-Za-z0-9_.\-]+)", item)
                if m:
                    names.add(m.group(1).lower())
        names |= {n[: -len("-base")] for n in names if n.endswith("-base")}  # matplotlib-base
        names |= {"torch"} if "pytorch" in names else set()
        assert needed <= names, (env_file, needed - names)
        # the package itself: pip `-e .` in the env or its post-deploy script
        post = Path(env_file).with_suffix("").with_suffix(".post-deploy.sh")
        pip_items = [i for d in env["dependencies"] if isinstance(d, dict) for i in d.get("pip", [])]
        assert any(i.startswith("-e") for i in pip_items) or (
            post.is_file() and re.search(r"pip install .*-e \.", post.read_text())), env_file


# --------------------------------------------------------------------------- targets (dry runs)

def test_default_target_is_the_default_reports(project, rules):
    assert rules["default_target"] in ("default", "all")
    cfgs = dag.compose_all()
    jobs = planned_jobs(project, targets=())
    assert job_keys(jobs) == expected_jobs(cfgs, DEFAULT_EXPERIMENTS)
    assert ("report", DEFAULT_EXPERIMENTS[0]) in job_keys(jobs)


def test_every_experiment_has_a_report_target(project):
    names = experiment_names(project / "config")
    assert {"mnist5k", "mnist5k_gloro", "smoke", "smoke_gloro", "cifar10"} <= set(names)
    cfgs = dag.compose_all()
    jobs = planned_jobs(project, targets=[str(paths.report(n)) for n in names])
    assert job_keys(jobs) == expected_jobs(cfgs, names)
    # one certify job per radius, with the radius as a wildcard
    for n in names:
        certs = sorted(k[2] for k in job_keys(jobs) if k[:2] == ("certify", n))
        assert set(radius_tag(r) for r in cfgs[n].certify.radii) <= set(certs)
    # the wildcard is constrained to the known experiments
    p = snakemake(project, "-n", "--cores", "1", "results/not_an_experiment/report.md", check=False)
    assert p.returncode != 0 and "No rule to produce" in p.stdout + p.stderr


def test_report_depends_on_its_baseline(project):
    jobs = job_keys(planned_jobs(project, targets=["results/mnist5k/report.md"]))
    for b in ("mnist5k_gloro", "mnist5k_bcp"):  # every baseline the report shows
        assert ("train", b) in jobs
        for r in dag.compose_all()["mnist5k"].certify.radii:
            assert ("certify", b, radius_tag(r)) in jobs
        assert ("report", b) not in jobs  # its certificates, not its report


# --------------------------------------------------------------------------- configuration

def _shell_cfgs(text: str) -> dict:
    """{(stage, experiment[, radius]): stage config} from the commands of `snakemake -n -p`."""
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if "locallip " not in line or "--cfg-json" not in line:
            continue
        words = shlex.split(line)
        stage = words[words.index("locallip") + 1]
        cfg = json.loads(words[words.index("--cfg-json") + 1])
        name = cfg["config"]["name"] if stage == "report" else cfg["name"]
        key = (stage, name) + ((radius_tag(cfg["radius"]),) if stage == "certify" else ())
        found[key] = cfg
    return found


def test_jobs_receive_exactly_their_stage_config(project):
    overrides = ["train.epochs=3", "certify.max_iter=77"]
    p = snakemake(project, "-n", "-p", "--cores", "1", "results/smoke/report.md",
                  "--config", f"overrides={json.dumps(overrides)}")
    found = _shell_cfgs(p.stdout)
    cfgs = {n: compose(n, overrides) for n in (SMOKE, SMOKE_BASELINE)}
    assert len(found) == 2 * 5 + 4 + 1 and ("train", SMOKE) in found  # smoke report only
    for key, cfg in found.items():
        stage, name = key[0], key[1]
        radius = float(key[2]) if stage == "certify" else None
        assert cfg == dag.job(cfgs, name, stage, radius).params, key
        if stage != "report":  # the report's settings also carry the commands that rebuild it
            assert cfg == plain(stage_config(cfgs[name], stage, radius)), key
    first = radius_tag(cfgs[SMOKE].certify.radii[0])
    assert found[("train", SMOKE)]["train"]["epochs"] == 3
    assert found[("certify", SMOKE, first)]["certify"]["max_iter"] == 77
    assert "radii" not in found[("certify", SMOKE, first)]["certify"]  # a new radius changes no other job


@pytest.mark.parametrize("override, message", [
    ("train.epochz=5", "train.epochz"),  # unknown key
    ("train.epochs=five", "five"),  # wrong type
    ("model.arch=9c9f", "9c9f"),  # value out of range (validate)
])
def test_bad_override_fails_at_parse_time(project, override, message):
    p = snakemake(project, "-n", "--cores", "1", "--config", f"overrides={json.dumps([override])}", check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "locallip configuration error" in out and message in out, out[-3000:]
    assert "Building DAG" not in out  # failed before any job was planned
    assert not (project / "results").exists()


@pytest.mark.parametrize("config", [
    ["overrides=train.epochs=5"],  # a string where a list is expected
    ["not_a_setting=[]"],  # unknown key (a typo of overrides)
    ["experiment_overrides=[1]"],
])
def test_snakemake_config_is_validated_by_the_schema(project, config):
    p = snakemake(project, "-n", "--cores", "1", "--config", *config, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "Error validating config" in out, out[-3000:]


def test_unknown_experiment_in_config(project):
    p = snakemake(project, "-n", "--cores", "1", "--config", 'experiments=["nope"]', check=False)
    assert p.returncode != 0 and "unknown experiment 'nope'" in p.stdout + p.stderr


# --------------------------------------------------------------------------- real smoke run

def test_smoke_run_produced_every_output(smoke):
    cfgs = dag.compose_all(SPEED_OVERRIDES)
    for n in (SMOKE, SMOKE_BASELINE):
        expected = [paths.splits(n), paths.model(n), paths.train_metrics(n), paths.calibrated_model(n),
                    paths.calibration(n), paths.report(n), paths.training_plot(n), paths.diagnostics_plot(n),
                    paths.radius_plot(n), paths.radii_table(n), paths.time_plot(n), paths.steps_table(n)]
        expected += [f(n, r) for r in cfgs[n].certify.radii
                     for f in (paths.certificate, paths.certificate_table)]
        for f in expected:
            assert (smoke / f).is_file() and (smoke / f).stat().st_size > 0, f
        cert = json.loads((smoke / paths.certificate(n, cfgs[n].certify.radii[0])).read_text())
        assert cert["radius"] == cfgs[n].certify.radii[0]
        # the resume checkpoint survives, and is no declared output
        assert (smoke / paths.train_state(n)).is_file()
    summary = snakemake(smoke, "--summary", "--cores", "1", *smoke_config()).stdout
    assert str(paths.model(SMOKE)) in summary and str(paths.train_state(SMOKE)) not in summary


def test_nothing_to_do_after_the_run(smoke):
    assert planned_jobs(smoke, targets=(), config=smoke_config()) == []
    assert planned_jobs(smoke, targets=()) == []  # the copy's default config is the smoke run's


def test_new_radius_adds_one_certify_job_and_the_report(smoke):
    r = new_radius()
    tag = radius_tag(r)
    # an experiment without a baseline: exactly one certify job plus its export and report
    new = [radii_override(smoke_radii(SMOKE_BASELINE) + [r])]
    jobs = planned_jobs(smoke, targets=[f"results/{SMOKE_BASELINE}/report.md"],
                        config=smoke_config(experiment_overrides={SMOKE_BASELINE: new}))
    assert job_keys(jobs) == [("certify", SMOKE_BASELINE, tag), ("export", SMOKE_BASELINE), ("report", SMOKE_BASELINE)]
    # with a baseline: its report also needs the baseline certified at the new radius
    new = [radii_override(smoke_radii(SMOKE) + [r])]
    jobs = planned_jobs(smoke, targets=[f"results/{SMOKE}/report.md"],
                        config=smoke_config(experiment_overrides={SMOKE: new}))
    # (the baseline's export card holds its own radii only: it does not change)
    assert job_keys(jobs) == [("certify", SMOKE, tag), ("certify", SMOKE_BASELINE, tag), ("export", SMOKE),
                              ("report", SMOKE)]


def test_training_setting_reruns_train_onward(smoke):
    jobs = planned_jobs(smoke, targets=[f"results/{SMOKE}/report.md"],
                        config=smoke_config(experiment_overrides={SMOKE: ["train.lr=0.002"]}))
    assert job_keys(jobs) == sorted([("calibrate", SMOKE), ("export", SMOKE), ("radii", SMOKE), ("report", SMOKE), ("train", SMOKE)]
                                    + [("certify", SMOKE, radius_tag(r)) for r in smoke_radii(SMOKE)])


def test_certify_setting_reruns_only_certify_and_report(smoke):
    jobs = planned_jobs(smoke, targets=[f"results/{SMOKE_BASELINE}/report.md"],
                        config=smoke_config(experiment_overrides={SMOKE_BASELINE: ["certify.attack.steps=7"]}))
    # the attack is part of every certify job's settings, and of the radii job's (same settings section)
    assert job_keys(jobs) == sorted([("export", SMOKE_BASELINE), ("radii", SMOKE_BASELINE), ("report", SMOKE_BASELINE)]
                                    + [("certify", SMOKE_BASELINE, radius_tag(r))
                                       for r in smoke_radii(SMOKE_BASELINE)])


def test_bound_code_change_reruns_train_onward(smoke, tmp_path):
    project = clone_project(smoke, tmp_path / "p")
    touch_later(project / "src" / "locallip" / "bounds" / "localbound.py", append="\n# a change to the bound code\n")
    jobs = job_keys(planned_jobs(project, targets=()))
    stages = sorted({k[0] for k in jobs})
    assert stages == ["calibrate", "certify", "export", "radii", "report", "train"], jobs
    assert ("train", SMOKE) in jobs and ("train", SMOKE_BASELINE) in jobs
    assert len([k for k in jobs if k[0] == "certify"]) == len(smoke_radii(SMOKE)) + len(smoke_radii(SMOKE_BASELINE))


def test_report_code_change_reruns_only_the_report(smoke, tmp_path):
    project = clone_project(smoke, tmp_path / "p")
    before = mtimes(outputs_of(project, SMOKE))
    touch_later(project / "src" / "locallip" / "stages" / "report" / "render.py", append="\n# a change to the report\n")
    assert job_keys(planned_jobs(project, targets=())) == [("report", SMOKE), ("report", SMOKE_BASELINE)]
    assert mtimes(outputs_of(project, SMOKE)) == before  # a dry run touches nothing


def test_touched_input_with_same_content_reruns_nothing(smoke, tmp_path):
    """Snakemake compares checksums of small inputs: a newer mtime alone is no change."""
    project = clone_project(smoke, tmp_path / "p")
    touch_later(project / paths.train_metrics(SMOKE_BASELINE))
    assert planned_jobs(project, targets=()) == []


def test_snakemake_html_report(smoke, tmp_path):
    """`snakemake --report report.html`: the standard self-contained report, with the report, its plots
    and the certificate tables, described by workflow/report/*.rst."""
    project = clone_project(smoke, tmp_path / "p")
    snakemake(project, "--report", "report.html", *smoke_config(), timeout=600)
    html = (project / "report.html").read_text(errors="replace")
    assert len(html) > 50_000
    for name in ("report.md", "training.png", "bound_diagnostics.png", "certified_vs_radius.png", "radius_0.1.csv",
                 "certified_vs_time.png", "steps.csv", "Certification", "locallip: certifiably robust"):
        assert name in html, name


def test_profiles_set_resources_are_two_level_mappings():
    """Snakemake refuses a profile whose set-resources has a rule with no mapping (e.g. only comments)."""
    for cfg in sorted((REPO / "workflow" / "profiles").glob("*/config.y*ml")):
        doc = yaml.safe_load(cfg.read_text()) or {}
        for rule, res in (doc.get("set-resources") or {}).items():
            assert isinstance(res, dict) and res, f"{cfg}: set-resources.{rule} must be a mapping, got {res!r}"
            assert all(isinstance(v, (int, float, str)) for v in res.values()), (cfg, rule, res)
