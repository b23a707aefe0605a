"""The smoke experiment through the SLURM executor on a real local SLURM.

Starts a single-node SLURM on localhost with workflow/scripts/local_slurm.sh
(2 fake GPUs, partition ``debug``, no accounting database), runs

    snakemake --profile workflow/profiles/slurm \
              --profile workflow/profiles/slurm-local results/smoke/report.md

in a temporary copy of the repository (with one radius and one short epoch to cut
the CPU time), and checks that the report was written, that
train/calibrate/certify ran as SLURM jobs, and that those jobs asked SLURM for
a GPU (``--gpus=1`` on the sbatch line, ``gres:gpu:1`` in ``scontrol``).

Skipped (outside CI only) when the SLURM binaries are missing or we are not
root; with CI=true it fails instead.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_helpers import config_args, copy_project, env_for

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "workflow" / "scripts" / "local_slurm.sh"
PROFILE = "workflow/profiles/slurm"
PROFILE_LOCAL = "workflow/profiles/slurm-local"
TARGET = "results/smoke/report.md"
GPU_RULES = ("train", "calibrate", "certify")
# One short epoch on 200 digits: these tests check the SLURM path, not numbers.
SHORT_TRAINING = ["train.epochs=1", "train.ramp_epochs=1", "train.diagnostics_size=0", "dataset.train_limit=200"]
RUN_TIMEOUT_S = int(os.environ.get("LOCALLIP_SLURM_TEST_TIMEOUT", "1200"))

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"SLURM test cannot run under CI: {reason}")
    pytest.skip(reason)


def _script(cmd: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def local_slurm():
    """A running local SLURM; yields the environment (SLURM_CONF set)."""
    if not sys.platform.startswith("linux"):
        _unavailable("local SLURM needs Linux")
    env = dict(os.environ)
    env.pop("SNAKEMAKE_PROFILE", None)
    binaries = ("slurmctld", "slurmd", "sbatch", "squeue", "munged")
    if not all(shutil.which(b) for b in binaries):
        if not IN_CI:
            pytest.skip(
                "SLURM binaries (slurmctld, slurmd, sbatch, munged) not installed; "
                f"run `{SCRIPT.relative_to(REPO)} install` (root, apt) to enable"
            )
        # under CI: install them (needs root + apt), or fail
        r = _script("install", env, timeout=900)
        if r.returncode != 0:
            pytest.fail(f"installing SLURM failed:\n{r.stdout}\n{r.stderr}")
    if os.geteuid() != 0:
        _unavailable("starting the local SLURM daemons needs root")

    # One SLURM test at a time per machine (other pytest sessions share the
    # cluster's state dir): hold a lock while the cluster is in use, so that
    # one session's teardown cannot stop the cluster under another's run.
    state = Path(os.environ.get("LOCALLIP_SLURM_DIR", "/tmp/locallip-slurm"))
    lock = open(f"{state}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        was_running = _script("status", env).returncode == 0
        r = _script("start", env, timeout=300)
        if r.returncode != 0:
            pytest.fail(f"local SLURM did not come up:\n{r.stdout}\n{r.stderr}")
        conf = _script("env", env).stdout.strip().split("=", 1)[1]
        env["SLURM_CONF"] = conf
        yield env
        if not was_running:
            _script("stop", env, timeout=120)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _submitted(log: str) -> dict[str, list[str]]:
    """rule -> SLURM job ids, from "Job N has been submitted with SLURM jobid M (log: .../rule_R/...)"."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(
        r"has been submitted with SLURM jobid (\d+) \(log: \S*?/rule_([A-Za-z0-9_]+)/", log
    ):
        out.setdefault(m.group(2), []).append(m.group(1))
    return out


def _sbatch_calls(log: str) -> dict[str, list[str]]:
    """rule -> sbatch command lines (logged at debug level, i.e. with --verbose)."""
    out: dict[str, list[str]] = {}
    for line in log.splitlines():
        if "sbatch call:" not in line:
            continue
        m = re.search(r"--comment '?rule_([A-Za-z0-9]+(?:_[A-Za-z0-9]+)*?)(?:_wildcards_|'|\s)", line)
        if m:
            out.setdefault(m.group(1), []).append(line)
    return out


def test_smoke_pipeline_through_slurm(local_slurm, tmp_path):
    env = local_slurm
    work = copy_project(tmp_path / "project")
    # Jobs run `python -m snakemake` with this interpreter and inherit this
    # environment (sbatch --export=ALL): env_for puts the venv's bin (the
    # `locallip` CLI) first on PATH and the copy's src on PYTHONPATH.
    env = env_for(work, {"SLURM_CONF": env["SLURM_CONF"]})
    env.pop("SNAKEMAKE_PROFILE", None)
    cmd = [
        sys.executable, "-m", "snakemake",
        "--profile", PROFILE, "--profile", PROFILE_LOCAL,
        "--verbose",  # logs the sbatch command lines
        TARGET,
        # one radius per experiment and a short training: still every job of the
        # pipeline, a fraction of the CPU time (this test is about the SLURM path, not numbers)
        *config_args(overrides=["certify.radii=[0.5]", *SHORT_TRAINING]),
    ]
    logfile = tmp_path / "snakemake.log"
    with open(logfile, "w") as fh:
        proc = subprocess.run(
            cmd, cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S
        )
    log = logfile.read_text()
    slurm_logs = work / ".snakemake" / "slurm_logs"

    def context() -> str:
        failed = "\n".join(
            f"--- {p} ---\n" + p.read_text()[-3000:] for p in sorted(slurm_logs.rglob("*.log"))
        ) if slurm_logs.exists() else ""
        return f"snakemake rc={proc.returncode}; log tail:\n{log[-6000:]}\n{failed[-8000:]}"

    assert proc.returncode == 0, context()
    report = work / TARGET
    assert report.is_file() and report.stat().st_size > 0, context()

    # train and certify (and calibrate) went through SLURM ...
    submitted = _submitted(log)
    for rule in ("train", "certify"):
        assert submitted.get(rule), f"no SLURM submission for rule {rule}: {submitted}\n" + context()
        logs = list((slurm_logs / f"rule_{rule}").rglob("*.log"))
        assert logs, f"no SLURM job log for rule {rule} under {slurm_logs}"
        # the job log is written by the job-side snakemake run
        assert any(f"rule {rule}:" in p.read_text() for p in logs)
    # ... download and report did not (localrules)
    for rule in ("download", "report"):
        assert rule not in submitted, f"{rule} should be a localrule, was submitted: {submitted}"

    # every GPU rule that was submitted asked SLURM for a GPU
    calls = _sbatch_calls(log)
    for rule in GPU_RULES:
        if rule not in submitted:
            continue
        assert calls.get(rule), f"no sbatch call logged for {rule}\n" + context()
        for call in calls[rule]:
            assert re.search(r"--gpus=(\S+:)?1\b|--gres=gpu:", call), call
    # SLURM's own record (kept MinJobAge=600 s) shows the GPU allocation
    jobid = submitted["train"][0]
    show = subprocess.run(
        ["scontrol", "show", "job", "-o", jobid], env=env, capture_output=True, text=True
    )
    if show.returncode == 0 and show.stdout.strip():
        assert re.search(r"gres/gpu[=:]1|gres:gpu:1|gpu:1", show.stdout), show.stdout
        assert "JobState=COMPLETED" in show.stdout, show.stdout


def test_data_parallel_training_through_slurm(local_slurm, tmp_path):
    """run.processes=2: the train job asks SLURM for 2 GPUs on one node and runs torchrun with 2
    processes (gloo on this CPU-only machine; the GPUs are fake)."""
    work = copy_project(tmp_path / "project")
    env = env_for(work, {"SLURM_CONF": local_slurm["SLURM_CONF"]})
    env.pop("SNAKEMAKE_PROFILE", None)
    target = "results/smoke/train/model.pt"
    cmd = [sys.executable, "-m", "snakemake", "--profile", PROFILE, "--profile", PROFILE_LOCAL, "--verbose", target,
           *config_args(overrides=["run.processes=2", *SHORT_TRAINING])]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    calls = _sbatch_calls(log)
    assert calls.get("train"), log[-4000:]
    assert all(re.search(r"--gpus=(\S+:)?2\b", c) for c in calls["train"]), calls["train"]
    metrics = (work / "results" / "smoke" / "train" / "metrics.json").read_text()
    assert '"processes": 2' in metrics
    train_log = (work / "results" / "smoke" / "logs" / "train.log").read_text()
    assert "best epoch 1" in train_log
