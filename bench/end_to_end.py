"""End to end: wall time of the mnist5k pipeline from scratch on this machine (target <= 10 minutes).

Copies the project (Snakefile, workflow/, config/, src/, ... -- ``tests/pipeline_helpers.copy_project``)
into a temporary directory and runs, with the copy's sources on PYTHONPATH:

    snakemake --cores 2 --profile workflow/profiles/default results/mnist5k/report.md

(which also builds the report's GloRo baseline, mnist5k_gloro). Records the wall time,
the CPU time of all child processes, the machine load around the run (the machine is
shared, so wall time on a busy machine overstates the time on an idle one), the time
of every Snakemake job (from its log), and the headline numbers of the results.

    python -m bench.end_to_end [--quick] [--keep]
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import REPO, machine_info, parser, write_result

TARGET_S = 600.0
TARGET = "results/mnist5k/report.md"


def _helpers():
    spec = importlib.util.spec_from_file_location("pipeline_helpers", REPO / "tests" / "pipeline_helpers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_TS = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
_RULE = re.compile(r"^(?:local)?rule (\S+):$")
_JOBID = re.compile(r"^\s+jobid: (\d+)$")
_WILD = re.compile(r"^\s+wildcards: (.*)$")
_DONE = re.compile(r"^Finished job(?:id:)? (\d+)")


def job_times(text: str) -> list:
    """[(rule, wildcards, seconds)] from Snakemake's log (1 s resolution timestamps)."""
    now, jobs, out = None, {}, []
    pending = None
    for line in text.splitlines():
        m = _TS.match(line.strip())
        if m:
            now = _dt.datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
            continue
        m = _RULE.match(line.strip())
        if m:
            pending = {"rule": m.group(1), "start": now, "wildcards": ""}
            continue
        m = _WILD.match(line)
        if m and pending is not None:
            pending["wildcards"] = m.group(1)
            continue
        m = _JOBID.match(line)
        if m and pending is not None:
            jobs[m.group(1)] = pending
            continue
        m = _DONE.match(line.strip())
        if m and m.group(1) in jobs and now is not None:
            j = jobs.pop(m.group(1))
            if j["start"] is not None:
                out.append({"rule": j["rule"], "wildcards": j["wildcards"],
                            "seconds": (now - j["start"]).total_seconds()})
    return out


def headline(project: Path) -> dict:
    res = {}
    for exp_dir in sorted((project / "results").iterdir()):
        if not exp_dir.is_dir():
            continue
        e = {}
        try:
            m = json.loads((exp_dir / "train" / "metrics.json").read_text())
            e["train_time_s"] = m.get("train_time_s")
            e["best_validation"] = m.get("best_validation")
        except (OSError, ValueError):
            pass
        certs = {}
        for f in sorted((exp_dir / "certify").glob("radius_*.json")):
            s = json.loads(f.read_text())
            certs[str(s["radius"])] = {k: s.get(k) for k in ("clean_acc", "certified_acc_local",
                                                             "certified_acc_global", "median_bound_ratio",
                                                             "samples_per_s", "time_s")}
        e["certify"] = certs
        res[exp_dir.name] = e
    return res


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="keep the temporary project copy")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    args = p.parse_args(argv)
    helpers = _helpers()
    info = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="locallip-e2e-"))
    project = helpers.copy_project(tmp / "project")
    config_args = []
    if args.quick:  # a short smoke of the same pipeline: few epochs, few iterations
        config_args = helpers.config_args(["train.epochs=2", "train.ramp_epochs=1", "dataset.train_limit=600",
                                          "dataset.test_limit=100", *helpers.SPEED_OVERRIDES])
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(args.cores), "--profile", "workflow/profiles/default",
           TARGET, *config_args]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(project / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    print(f"[end_to_end] {' '.join(cmd[1:])}\n[end_to_end] in {project}", flush=True)
    load_before = os.getloadavg()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=args.timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or ""), (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) \
            else (e.stderr or "")
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    ok = rc == 0 and (project / TARGET).exists()
    data = {
        "quick": args.quick, "machine": info, "command": " ".join(["snakemake", *cmd[3:]]),
        "config_overrides": config_args, "returncode": rc, "ok": ok,
        "wall_s": wall, "children_cpu_s": cpu,
        "cpu_bound_estimate_s": cpu / max(args.cores, 1),
        "load_average_before": load_before, "load_average_after": load_after,
        "jobs": job_times(out + "\n" + err),
        "results": headline(project) if ok else None,
        "target": {"target_max_s": TARGET_S, "wall_s": wall, "met": ok and wall <= TARGET_S},
        "experiment_config": (REPO / "config" / "experiment" / "mnist5k.yaml").read_text(),
    }
    if not ok:
        data["log_tail"] = (out + "\n" + err)[-5000:]
    print(f"[end_to_end] rc {rc}, wall {wall:.0f}s ({wall / 60:.1f} min), children CPU {cpu:.0f}s, "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}", flush=True)
    for j in data["jobs"]:
        print(f"    {j['rule']:10s} {j['wildcards']:40s} {j['seconds']:6.0f}s")
    write_result("end_to_end" + ("_quick" if args.quick and not args.out else ""), data, args.out)
    if args.keep:
        print(f"[end_to_end] kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return data


if __name__ == "__main__":
    main()
