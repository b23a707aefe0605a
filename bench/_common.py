"""Shared helpers of the benchmarks: machine info, interleaved timing, result files, a trained model.

The machine these run on is small and noisy (other processes share its cores), so
every benchmark compares variants *within one run*: the variants are interleaved
round by round (in a shuffled order each round), every round gives one ratio, and
we report the median ratio with its spread (quartiles, min/max) over the rounds.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
WORK_DIR = REPO / "bench" / "out"  # scratch (trained models, data): ignored by git (/bench/out/)

if str(REPO / "src") not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "src"))


# --------------------------------------------------------------------------- CLI & machine


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fast smoke run (few repetitions, small sizes)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine 2 threads stall "
                        "on each other and the timings become meaningless)")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/<name>.json)")
    return p


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def git_commit() -> Dict[str, object]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--", "src", "config", "workflow", "Snakefile")
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(status),  # uncommitted changes in src/ config/ workflow/ (the code measured)
            "dirty_files": status.splitlines()[:20]}


def machine_info() -> Dict[str, object]:
    import torch

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_gb": mem_gb,
        "load_average_at_start": load,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": "none: no GPU is lent to this task; every figure is CPU",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_commit(),
    }


def write_result(name: str, data: dict, out: Optional[Path] = None) -> Path:
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, **data}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)
    print(f"[bench] wrote {path}")
    return path


def _json_default(o):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --------------------------------------------------------------------------- statistics & timing


def spread(values: Sequence[float]) -> Dict[str, float]:
    """median, quartiles, min, max and count of a list of numbers."""
    v = sorted(float(x) for x in values)
    if not v:
        return {"n": 0}
    if len(v) >= 2:
        q = statistics.quantiles(v, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    else:
        q1 = q3 = v[0]
    return {"median": statistics.median(v), "q1": q1, "q3": q3, "min": v[0], "max": v[-1], "n": len(v)}


def interleaved(variants: Dict[str, Callable[[], object]], rounds: int, per_round: int = 1, warmup: int = 1,
                seed: int = 0) -> Dict[str, List[float]]:
    """Time every variant ``per_round`` times per round, the variants in a new shuffled order each round.

    Returns the per-round mean time (seconds) of every variant: the lists are aligned by round,
    so ``times[a][i] / times[b][i]`` is a ratio taken under the same machine load.
    """
    rng = random.Random(seed)
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            for _ in range(per_round):
                variants[name]()
            times[name].append((time.perf_counter() - t0) / per_round)
    return times


def ratios(times: Dict[str, List[float]], num: str, den: str) -> Dict[str, float]:
    """Spread of the per-round ratios times[num] / times[den]."""
    return spread([a / b for a, b in zip(times[num], times[den])])


# --------------------------------------------------------------------------- a trained mnist5k model


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Options of the benchmarks that need a trained mnist5k model (see ``model_from_args``)."""
    p.add_argument("--train", action="store_true",
                   help="train a model in bench/out even if results/mnist5k/train/model.pt exists")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs override when training here")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override of the mnist5k config (repeatable); implies training here")


def model_from_args(args: argparse.Namespace):
    """``trained_model("mnist5k")`` with the overrides ``--epochs`` / ``--quick --train`` / ``--override`` ask for."""
    overrides: List[str] = []
    if args.epochs:
        overrides = [f"train.epochs={args.epochs}", f"train.ramp_epochs={max(1, args.epochs // 2)}"]
    elif args.quick and args.train:
        overrides = ["train.epochs=2", "train.ramp_epochs=1"]
    overrides += args.override
    return trained_model("mnist5k", overrides, reuse_results=not args.train)


def _cfg_hash(cfg) -> str:
    from locallip.foundation.compose import plain

    keep = {k: plain(getattr(cfg, k)) for k in ("dataset", "model", "train")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def trained_model(experiment: str = "mnist5k", overrides: Sequence[str] = (), reuse_results: bool = True,
                  progress: bool = False):
    """A trained model of ``experiment``, its test split and a description of where it came from.

    Reuses ``results/<experiment>/train/model.pt`` (the pipeline's train output) when
    present and ``reuse_results``; otherwise trains with ``run_train`` on the composed
    configuration (plus ``overrides``) in ``bench/out/``, cached by a hash of the
    dataset/model/train settings.

    Returns (model, x_test, y_test, cfg, info).
    """
    from locallip.data.splits import load_splits, to_tensors
    from locallip.foundation import layout as paths
    from locallip.nn.checkpoint import load_model
    from locallip.foundation.compose import compose
    from locallip.foundation.schema import RunConfig
    from locallip.pipeline.table import stage_config
    from locallip.stages.download import run_download
    from locallip.stages.train import run_train

    cfg = compose(experiment, list(overrides), config_dir=REPO / "config")
    pipeline_model = REPO / paths.model(experiment)
    pipeline_splits = REPO / paths.splits(experiment)
    info: Dict[str, object] = {"experiment": experiment, "overrides": list(overrides)}
    if reuse_results and not overrides and pipeline_model.exists() and pipeline_splits.exists():
        model, ck = load_model(pipeline_model)
        splits = load_splits(pipeline_splits)
        info.update(source=str(pipeline_model.relative_to(REPO)), train=ck.get("train"), epoch=ck.get("epoch"),
                    validation=ck.get("validation"))
    else:
        work = WORK_DIR / f"{experiment}-{_cfg_hash(cfg)}"
        work.mkdir(parents=True, exist_ok=True)
        data = work / "splits.npz"
        if not data.exists():
            run_download(stage_config(cfg, "download"), data)
        model_path = work / "model.pt"
        t0 = time.perf_counter()
        if not model_path.exists():
            summary = run_train(stage_config(cfg, "train"), data, model_path, work / "metrics.json",
                                work / "state" / "last.pt", run=RunConfig(progress=progress))
            info["train_time_s"] = summary["train_time_s"]
            info["trained_now"] = True
        else:
            info["trained_now"] = False
            try:
                info["train_time_s"] = json.loads((work / "metrics.json").read_text())["train_time_s"]
            except (OSError, ValueError, KeyError):
                pass
        model, ck = load_model(model_path)
        splits = load_splits(data)
        info.update(source=str(model_path.relative_to(REPO)), train=ck.get("train"), epoch=ck.get("epoch"),
                    validation=ck.get("validation"), wall_s=time.perf_counter() - t0)
    x, y = to_tensors(splits.test_x, splits.test_y)
    info["arch"] = model.spec.get("arch")
    info["activation"] = model.spec.get("activation")
    return model, x, y, cfg, info
