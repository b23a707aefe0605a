"""Run every benchmark (each in its own process), then refresh the figures in bench/README.md.

    python bench/run_all.py [--quick] [--threads N] [--only NAME ...] [--skip NAME ...]

Order: train_step, certify_throughput, tightness, memory, certify_external, relaxation_cost, gain_map, end_to_end
(last: it takes the longest and needs the machine to itself as much as possible). ``--quick`` is a smoke run;
its results go to bench/out/quick/ and do not replace bench/results/.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("train_step", "certify_throughput", "tightness", "memory", "certify_external", "relaxation_cost",
              "gain_map", "end_to_end")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", choices=BENCHMARKS, default=None)
    p.add_argument("--skip", nargs="*", choices=BENCHMARKS, default=())
    args = p.parse_args(argv)
    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + str(REPO / "src") + (os.pathsep + env["PYTHONPATH"]
                                                                      if env.get("PYTHONPATH") else "")
    failed = []
    for name in names:
        cmd = [sys.executable, "-m", f"bench.{name}", "--threads", str(args.threads)]
        if args.quick:
            out = REPO / "bench" / "out" / "quick" / f"{name}.json"
            cmd += ["--quick", "--out", str(out)]
        print(f"[run_all] {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
        print(f"[run_all] {name}: rc {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
    if not args.quick:
        subprocess.run([sys.executable, "-m", "bench.summarize"], cwd=REPO, env=env)
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
