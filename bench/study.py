"""The Local-Lip vs GloRo training study: one configuration per run, the whole pipeline each.

Every run composes an experiment with Hydra overrides, then runs the library's
stages in this process: download (shared splits), train, calibrate, and
certification of the *validation* split (what settings are chosen by) and of
the *test* split (what is reported). It appends one JSON line per run to
``--out`` (default ``bench/out/study/runs.jsonl``): the overrides, the training
time, the per-epoch diagnostics of the last epoch and certified accuracies.

    python -m bench.study --tag lanczos8 -e mnist5k train.solver_steps=8
    python -m bench.study --tag gloro_eqtime -e mnist5k_gloro train.epochs=150 train.ramp_epochs=75
    python -m bench.study --table                 # markdown table of every recorded run

Settings are chosen on validation certified accuracy; the test columns are
reported, never used to choose. Runs take one torch thread by default.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

from bench._common import WORK_DIR, git_commit, machine_info  # noqa: F401 (sys.path set up there)

STUDY_DIR = WORK_DIR / "study"


def _certify_split(model, x, y, radii, settings) -> Dict[str, float]:
    from locallip.certify.split import certify_split

    out = {}
    for r in radii:
        res = certify_split(model, x, y, float(r), settings, progress=False)
        s = res["summary"]
        out[repr(float(r))] = {"clean": s["clean_acc"], "local": s["certified_acc_local"],
                               "global": s["certified_acc_global"], "broken": s["attack"]["broken"]}
    return out


def run_one(tag: str, experiment: str, overrides: List[str], out: Path, threads: int,
            test_limit: int = 0) -> dict:

    import torch

    from locallip.data.splits import load_splits, to_tensors
    from locallip.nn.checkpoint import load_model
    from locallip.foundation.compose import compose
    from locallip.foundation.schema import RunConfig
    from locallip.pipeline.table import stage_config
    from locallip.stages.calibrate import run_calibrate
    from locallip.stages.download import run_download
    from locallip.stages.train import run_train

    torch.set_num_threads(threads)
    cfg = compose(experiment, list(overrides))
    quiet = RunConfig(progress=False)
    run_dir = STUDY_DIR / tag
    splits = STUDY_DIR / "data" / f"{cfg.dataset.name}-{cfg.dataset.seed}.npz"
    if not splits.exists():
        run_download(stage_config(cfg, "download"), splits)
    t0 = time.perf_counter()
    metrics = run_train(stage_config(cfg, "train"), splits, run_dir / "model.pt", run_dir / "metrics.json",
                        run_dir / "state" / "last.pt", run=quiet)
    train_s = time.perf_counter() - t0
    cal = run_calibrate(stage_config(cfg, "calibrate"), splits, run_dir / "model.pt", run_dir / "calibrated.pt",
                        run_dir / "calibration.json", run=quiet)
    model, _ = load_model(run_dir / "calibrated.pt")
    sp = load_splits(splits)
    radii = [float(r) for r in cfg.certify.radii]
    settings = stage_config(cfg, "certify", radii[0]).certify
    xv, yv = to_tensors(sp.val_x, sp.val_y)
    xt, yt = to_tensors(sp.test_x, sp.test_y)
    if test_limit:  # the first N points of the official test split (large test sets on 2 CPU cores)
        xt, yt = xt[:test_limit], yt[:test_limit]
    val = _certify_split(model, xv, yv, radii, settings)
    test = _certify_split(model, xt, yt, radii, settings)
    last = metrics["epochs"][-1]
    row = {"tag": tag, "experiment": experiment, "overrides": list(overrides), "train_time_s": train_s,
           "epochs": cfg.train.epochs, "best_epoch": metrics["best_epoch"],
           "bound": str(cfg.train.bound), "loss": str(cfg.train.loss),
           "guarantee": str(settings.guarantee),
           "calibration_scales": cal.get("chosen_scales"),
           "last_epoch": {k: last.get(k) for k in ("fixed_per_layer", "fixed_per_layer_val",
                                                   "bound_ratio_layers_median", "bound_ratio_layers_worst",
                                                   "bound_ratio_median", "bound_ratio_worst", "time_s")},
           "test_points": int(len(yt)), "val": val, "test": test, "commit": git_commit(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def table(path: Path) -> str:
    """Markdown tables of every recorded run, one per set of certification radii."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return "(no runs)"
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r["test"].keys()), []).append(r)
    return "\n\n".join(_table(radii, group) for radii, group in groups.items())


def _table(radii: tuple, rows: List[dict]) -> str:
    head = (["run", "experiment", "overrides", "train s"] + [f"val cert {r}" for r in radii]
            + [f"test cert {r}" for r in radii] + [f"test global {r}" for r in radii]
            + ["test clean", "fixed % (last epoch)", "train/converged"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        le = r["last_epoch"]
        fixed = le.get("fixed_per_layer_val") or le.get("fixed_per_layer")
        ratio = le.get("bound_ratio_median")
        cells = [r["tag"], r["experiment"], " ".join(r["overrides"]) or "(defaults)", f"{r['train_time_s']:.0f}"]
        # "cert" is the local certificate (never below the global one); the global one beside it
        cells += [_pct(r["val"][k]["local"]) for k in radii] + [_pct(r["test"][k]["local"]) for k in radii]
        cells += [_pct(r["test"][k]["global"]) for k in radii]
        cells += [_pct(r["test"][radii[0]]["clean"]),
                  "/".join(f"{100 * f:.0f}" for f in fixed) if fixed else "—",
                  f"{ratio:.3f}" if ratio is not None else "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("-e", "--experiment", default="mnist5k")
    p.add_argument("--tag")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=STUDY_DIR / "runs.jsonl")
    p.add_argument("--test-limit", type=int, default=0, help="certify only the first N test points (0 = all)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    a = p.parse_args()
    if a.table:
        print(table(a.out))
        return
    tag = a.tag or "_".join([a.experiment] + [o.replace("train.", "").replace("model.", "") for o in a.overrides])
    row = run_one(tag, a.experiment, a.overrides, a.out, a.threads, a.test_limit)
    print(json.dumps({k: row[k] for k in ("tag", "train_time_s", "val", "test")}, indent=1))


if __name__ == "__main__":
    main()
