"""Shared helpers for the pipeline tests (Snakemake, DVC, SLURM).

Every test works on a *copy* of the project in a temporary directory
(``copy_project``): the Snakefile, workflow/, config/, src/, dvc.yaml,
params.yaml and .dvc/config -- never the real results/ or .snakemake/. Commands
run with ``PYTHONPATH=<copy>/src`` so the ``locallip`` CLI and the Snakefile
import the copy's sources (a test may edit them).

The heavy part -- one real Snakemake run of the ``smoke`` experiment (and its
``smoke_gloro`` baseline) -- is built once per test session by
``smoke_project``; tests get their own copy of it (``clone_project``) so they
can change files without affecting each other.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

#: What a copy of the project contains (relative to the repository root).
PROJECT_ITEMS = ("Snakefile", "workflow", "profiles", "config", "src", "pyproject.toml",
                 "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".snakemake", "tmp", "cache")

SMOKE = "smoke"
SMOKE_BASELINE = "smoke_gloro"
SMOKE_REPORT = f"results/{SMOKE}/report.md"
#: Applied to the smoke run of the tests (through the Snakemake config, like a user would):
#: fewer power iterations, so the tiny pipeline spends its time on orchestration, not math.
SPEED_OVERRIDES = ["train.val_max_iter=20", "train.diagnostics_size=32", "calibrate.max_iter=50",
                   "certify.max_iter=50", "certify.attack.restarts=1", "curve.tol=0.2"]


# --------------------------------------------------------------------------- project copies

def copy_project(dst: Path, items: Sequence[str] = PROJECT_ITEMS) -> Path:
    """Copy the project's sources (no results/, no .snakemake/) into ``dst``."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in items:
        src = REPO / item
        if not src.exists():
            continue
        target = dst / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=IGNORE, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
    return dst


def clone_project(src: Path, dst: Path) -> Path:
    """A full copy of a project directory (results, .snakemake metadata, mtimes kept)."""
    shutil.copytree(src, dst, symlinks=True)
    return Path(dst)


def env_for(project: Path, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(project) / "src") + (os.pathsep + env["PYTHONPATH"]
                                                     if env.get("PYTHONPATH") else "")
    env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_NO_UPDATER"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MPLBACKEND", "Agg")
    if extra:
        env.update(extra)
    return env


def run(cmd: Sequence[str], cwd: Path, check: bool = True, timeout: float = 900,
        env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run a command in ``cwd`` with the project's environment; on failure show its output."""
    p = subprocess.run(list(map(str, cmd)), cwd=cwd, env=env or env_for(cwd), text=True,
                       capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n"
                             f"--- stdout ---\n{p.stdout[-6000:]}\n--- stderr ---\n{p.stderr[-6000:]}")
    return p


def snakemake(project: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """``snakemake`` in ``project`` (targets first: ``--config`` takes every argument after it)."""
    return run([sys.executable, "-m", "snakemake", *args], cwd=project, check=check, timeout=timeout)


def dvc(project: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    return run([str(VENV_BIN / "dvc"), *args], cwd=project, check=check, timeout=timeout)


def dvc_pipeline(project: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python workflow/scripts/dvc_pipeline.py ARGS`` in the project copy."""
    return run([sys.executable, "workflow/scripts/dvc_pipeline.py", *args], cwd=project, check=check, timeout=timeout)


def git(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["git", "-c", "user.name=locallip-tests", "-c", "user.email=tests@localhost",
                "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", *args], cwd=project, check=check)


def smoke_cfg(name: str = SMOKE, overrides: Iterable[str] = ()):
    """The composed configuration (a ``Config``) of a smoke experiment as the tests run it."""
    from locallip.foundation.compose import compose

    return compose(name, [*SPEED_OVERRIDES, *overrides], config_dir=REPO / "config")


# A smaller smoke dataset for tests that train several times in-process (resume, retrain):
# what they check does not depend on the amount of data, and each training costs ~5x less.
SMALL_DATA_OVERRIDES = ["dataset.train_limit=200", "dataset.val_size=40", "train.diagnostics_size=0"]


def small_splits(path: Path, overrides: Iterable[str] = ()) -> Path:
    """Write the splits of the smoke experiment with ``SMALL_DATA_OVERRIDES`` (plus ``overrides``) to ``path``."""
    from locallip.pipeline.table import stage_config
    from locallip.stages.download import run_download

    run_download(stage_config(smoke_cfg(SMOKE, [*SMALL_DATA_OVERRIDES, *overrides]), "download"), Path(path))
    return Path(path)


def smoke_radii(name: str = SMOKE) -> List[float]:
    return [float(r) for r in smoke_cfg(name).certify.radii]


def new_radius() -> float:
    """A radius neither smoke experiment is certified at (for 'add a radius' tests)."""
    taken = set(smoke_radii(SMOKE)) | set(smoke_radii(SMOKE_BASELINE))
    return next(r for r in (0.25, 0.45, 0.65, 0.85, 1.05) if r not in taken)


def radii_override(radii: Iterable[float]) -> str:
    return "certify.radii=[" + ",".join(repr(float(r)) for r in radii) + "]"


def use_smoke_config(project: Path) -> None:
    """Make the smoke experiment (with SPEED_OVERRIDES) the copy's default Snakemake config,
    so plain `snakemake` / `python workflow/scripts/dvc_pipeline.py dvc` in the copy mean the smoke run."""
    import yaml

    cfg = {"experiments": [SMOKE], "overrides": list(SPEED_OVERRIDES), "experiment_overrides": {}}
    (Path(project) / "workflow" / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def smoke_config(overrides: Iterable[str] = (), experiment_overrides: Optional[dict] = None) -> List[str]:
    """``--config`` for the smoke run plus changes (``--config`` replaces the default lists)."""
    return config_args([*SPEED_OVERRIDES, *overrides], experiment_overrides, experiments=[SMOKE])


def config_args(overrides: Iterable[str] = (), experiment_overrides: Optional[dict] = None,
                experiments: Optional[Sequence[str]] = None) -> List[str]:
    """``--config`` arguments (put them last on the command line)."""
    entries = []
    if experiments is not None:
        entries.append(f"experiments={json.dumps(list(experiments))}")
    if overrides:
        entries.append(f"overrides={json.dumps(list(overrides))}")
    if experiment_overrides:
        entries.append(f"experiment_overrides={json.dumps(experiment_overrides)}")
    return ["--config", *entries] if entries else []


# --------------------------------------------------------------------------- dry runs

JOB_HEAD = re.compile(r"^(?:local)?rule (\S+):\s*$")
WILDCARDS = re.compile(r"^\s+wildcards: (.*)$")


def parse_dry_run(text: str) -> List[Tuple[str, Dict[str, str]]]:
    """The jobs of a ``snakemake -n`` output: [(rule, wildcards), ...] (aggregation rules included)."""
    jobs: List[Tuple[str, Dict[str, str]]] = []
    for line in text.splitlines():
        m = JOB_HEAD.match(line)
        if m:
            jobs.append((m.group(1), {}))
            continue
        m = WILDCARDS.match(line)
        if m and jobs:
            jobs[-1][1].update(dict(kv.split("=", 1) for kv in m.group(1).split(", ")))
    return jobs


def planned_jobs(project: Path, targets: Sequence[str] = (SMOKE_REPORT,), config: Sequence[str] = (),
                 extra: Sequence[str] = ()) -> List[Tuple[str, Dict[str, str]]]:
    """What ``snakemake -n`` would run, as [(rule, wildcards)], without the default/all target rules."""
    p = snakemake(project, "-n", "--cores", "1", *extra, *targets, *config)
    text = p.stdout + p.stderr
    if "Nothing to be done" in text:
        return []
    jobs = [j for j in parse_dry_run(text) if j[0] not in ("all", "default")]
    assert jobs, f"could not parse the dry run:\n{text[-4000:]}"
    return jobs


def job_keys(jobs: Iterable[Tuple[str, Dict[str, str]]]) -> List[Tuple[str, ...]]:
    """Sorted (rule, experiment[, radius]) tuples, for exact comparisons."""
    keys = []
    for rule, wc in jobs:
        key = (rule, wc.get("experiment", ""))
        if "radius" in wc:
            key += (wc["radius"],)
        keys.append(key)
    return sorted(keys)


def touch_later(path: Path, append: str = "") -> None:
    """Change a file (optionally its content) so it is strictly newer than everything before."""
    path = Path(path)
    if append:
        path.write_text(path.read_text() + append)
    later = time.time() + 2
    os.utime(path, (later, later))


# --------------------------------------------------------------------------- the real smoke run

_SMOKE_CACHE: Dict[str, Path] = {}


def smoke_project(tmp_path_factory) -> Path:
    """A project copy in which ``snakemake`` has run the smoke experiment (and its baseline) for real.

    Built once per test session, whichever test module asks first; do not modify it --
    take a ``clone_project`` of it.
    """
    if "smoke" not in _SMOKE_CACHE:
        project = copy_project(tmp_path_factory.mktemp("smoke-run") / "project")
        use_smoke_config(project)
        t0 = time.perf_counter()
        snakemake(project, "--cores", "2", timeout=1500)  # default target: the smoke + smoke_gloro reports
        print(f"[pipeline_helpers] smoke pipeline ran in {time.perf_counter() - t0:.0f}s")
        _SMOKE_CACHE["smoke"] = project
    return _SMOKE_CACHE["smoke"]


def outputs_of(project: Path, experiment: str) -> List[Path]:
    """Every result file of an experiment (what both orchestrators produce and track; not the logs, the
    resume state or train/last_good/, the kept copy of the last completed training run)."""
    d = Path(project) / "results" / experiment
    return sorted(p for p in d.rglob("*") if p.is_file() and not {"logs", "state", "last_good"} & set(p.parts))


def mtimes(files: Iterable[Path]) -> Dict[str, int]:
    return {str(f): f.stat().st_mtime_ns for f in files}


# --------------------------------------------------------------------------- static view of the workflow

_INSPECT = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import OutputSettings, ResourceSettings, ConfigSettings

class Wildcards:  # what a resource function of the default experiment receives
    experiment = "mnist5k"

def plain(res):
    out = {}
    for k in res.keys():
        v = res[k]
        if getattr(v, "is_evaluable", lambda: False)():  # a function of the job's wildcards
            try:
                v = v.evaluate(Wildcards(), input=[], attempt=1, threads=1, rulename="", async_run=False)
            except Exception as err:  # one that needs a real job: keep its description
                v = repr(err)
        v = v.value if hasattr(v, "value") else v
        out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
    return out

with SnakemakeApi(OutputSettings()) as api:
    w = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(),
                     snakefile=Path("Snakefile").resolve(), workdir=Path(".").resolve())
    wf = w._workflow
    rules = {}
    for r in wf.rules:
        conda = None
        if r.conda_env:
            conda = str((Path(str(r.snakefile)).parent / str(r.conda_env)).resolve())
        rules[r.name] = {"local": r.name in wf._localrules, "resources": plain(r.resources),
                         "conda": conda, "shell": r.shellcmd, "snakefile": str(r.snakefile),
                         "params": sorted(r.params.keys()) if hasattr(r.params, "keys") else []}
    print("@@JSON@@" + json.dumps({"default_target": wf.default_target, "rules": rules}))
"""


def inspect_workflow(project: Path) -> dict:
    """Rules as Snakemake parsed them: {default_target, rules: {name: {local, resources, conda, shell}}}."""
    p = run([sys.executable, "-c", _INSPECT], cwd=project)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("@@JSON@@")][-1]
    return json.loads(line[len("@@JSON@@"):])
