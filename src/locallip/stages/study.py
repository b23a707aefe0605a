"""One run of a study table: the train and calibrate stages, then certification of the *validation*
split (what settings are chosen by) and of the *test* split (what is reported), at every radius
of the table; one row JSON with what ``bench/study.py`` recorded (its rows stay comparable).

The stages are the pipeline's own (``run_train``, ``run_calibrate``) writing into the run's
directory, so a row's model is trained exactly as an experiment's is.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Dict

import torch

from ..certify.split import certify_split
from ..data.splits import load_splits, to_tensors
from ..foundation.compose import plain
from ..foundation.files import write_json
from ..foundation.layout import study_run_files, study_state
from ..foundation.provenance import code_version
from ..foundation.schema import RunConfig
from ..foundation.study import StudyRunStage
from ..nn.checkpoint import load_model
from .calibrate import run_calibrate
from .train import run_train

#: What the row keeps of the last epoch's diagnostics (the table's fixed share and bound ratio).
LAST_EPOCH_KEYS = ("fixed_per_layer", "fixed_per_layer_val", "bound_ratio_layers_median", "bound_ratio_layers_worst",
                   "bound_ratio_median", "bound_ratio_worst", "time_s")


def certify_radii(model, x, y, radii, settings) -> Dict[str, dict]:
    """Per radius (keyed by ``repr(float(r))``): clean and certified accuracy (local, global), audit breaks."""
    out = {}
    for r in radii:
        s = certify_split(model, x, y, float(r), settings, progress=False)["summary"]
        out[repr(float(r))] = {"clean": s["clean_acc"], "local": s["certified_acc_local"],
                               "global": s["certified_acc_global"], "broken": s["attack"]["broken"]}
    return out


def run_study_row(cfg: StudyRunStage, data: Path, out_dir: Path, run: RunConfig = RunConfig()) -> dict:
    """Train, calibrate and certify one run into ``out_dir``; returns (and writes) its row."""
    files = study_run_files(out_dir)
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    t0 = time.perf_counter()
    metrics = run_train(cfg.train, data, files["model"], files["metrics"], study_state(out_dir), run=run)
    train_s = time.perf_counter() - t0
    cal = run_calibrate(cfg.calibrate, data, files["model"], files["calibrated"], files["calibration"], run=run)
    model, _ = load_model(files["calibrated"])
    splits = load_splits(data)
    xv, yv = to_tensors(splits.val_x, splits.val_y)
    xt, yt = to_tensors(splits.test_x, splits.test_y)
    if cfg.test_limit:  # a prefix of the official test split (large test sets on few CPU cores)
        xt, yt = xt[:cfg.test_limit], yt[:cfg.test_limit]
    val = certify_radii(model, xv, yv, cfg.radii, cfg.certify)
    test = certify_radii(model, xt, yt, cfg.radii, cfg.certify)
    last = metrics["epochs"][-1]
    row = {"tag": cfg.tag, "experiment": cfg.experiment, "overrides": list(cfg.overrides),
           "train_time_s": train_s, "epochs": cfg.train.train.epochs, "best_epoch": metrics["best_epoch"],
           "bound": str(cfg.train.train.bound), "loss": str(cfg.train.train.loss),
           "guarantee": str(cfg.certify.guarantee), "calibration_scales": cal.get("chosen_scales"),
           "last_epoch": {k: last.get(k) for k in LAST_EPOCH_KEYS},
           "test_points": int(len(yt)), "val": val, "test": test, "commit": git_commit(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
           # beyond bench/study.py's fields: where the row belongs and what made it
           "table": cfg.table, "run": cfg.run, "seed": cfg.seed, "val_points": int(len(yv)),
           "code_version": code_version("stages.study"), "settings": plain(cfg)}
    write_json(files["row"], row)
    broken = sum(v["broken"] for split in (val, test) for v in split.values())
    print(f"[study] {cfg.table}/{cfg.run}: trained {train_s:.0f}s; test certified "
          + ", ".join(f"{k}: {v['local']:.3f}" for k, v in test.items()) + f"; audit {broken} broken -> {files['row']}")
    return row


def git_commit() -> dict:
    """The commit the run's code came from, if it runs in a git checkout (else nulls)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--", "src", "config", "workflow", "Snakefile")
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(status), "dirty_files": status.splitlines()[:20]}
