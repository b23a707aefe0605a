"""The radii stage: per test point, the largest radius it is certified at.

Local certificate (at the headline guarantee level): ``certify.certified_radius``, a
root search on the certificate's worst-case margin up to ``max_radius``, to a
relative width ``tol``; the value written is a radius at which the point *was*
certified. Global bound: closed form, min_j margin_j / (K ||w_y - w_j||), not capped; the
local radius written is never below it (the cascade starts with the global step).
Misclassified points get 0. Writes ``certify/radii.csv``; the report draws
certified accuracy against the radius from it.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

from ..certify.split import radii_split
from ..data.splits import load_splits, to_tensors
from ..distributed import process_group, set_threads
from ..nn.checkpoint import load_model
from ..foundation.schema import RadiiStage, RunConfig
from ..foundation.files import csv_text, stage_lock, write_text



def run_radii(cfg: RadiiStage, data: Path, model: Path, out: Path, run: RunConfig = RunConfig()) -> dict:
    """Radii stage: per test point, the largest certified radius -> CSV. Sharded under torchrun."""
    with process_group() as group:
        with (stage_lock(out, "radii") if group.main else nullcontext()):
            set_threads(run.threads, group)
            t0 = time.perf_counter()
            splits = load_splits(Path(data))
            net, _ = load_model(Path(model))
            x, y = to_tensors(splits.test_x, splits.test_y)
            rows = radii_split(net, x, y, cfg.certify, cfg.max_radius, cfg.tol, progress=run.progress, group=group,
                               batch_size=cfg.batch_size)
            if group.main:
                write_text(out, csv_text(rows))
                print(f"[radii] {cfg.name}: {len(rows)} points, local certificate at the {cfg.certify.guarantee} "
                      f"level, up to radius {cfg.max_radius:g} ({time.perf_counter() - t0:.1f}s) -> {out}")
        group.barrier()
    return {"n": len(rows)}
