"""Certification throughput: the cascade against one level for every point, in one run.

Baseline ("single level") = the local certificate computed at the probabilistic level for
every point (``certify(..., cascade=False)``: masked Lanczos with the Kuczynski-Wozniakowski
inflation on every point, combined with the global margins), the path the pipeline took
before the cascade. Cascade = ``certify(...)`` with the certify stage's defaults: global
margins, then the boxes on the guaranteed global norms, then (for the correct points still
open) a from-below screen and exact / probabilistic masked norms.

On the same test points of a trained model (float64 model, float32 iterations, batches of
``certify.batch_size``, the guaranteed global bound computed once outside the timed region,
as the certify stage does), both are timed over the configured radii, interleaved round
by round; so are ``certified_radius`` with and without the cascade (each in the batches the
radii stage gives it: ``certify.batch_size`` for one level everywhere, its best on CPU, and
``curve.batch_size`` for the cascade). Reports samples/s, the
speed-up per round, certified accuracy per radius, per-point agreement, the points per
cascade step (and the deterministic share), how the radii compare (never smaller than the
single level's beyond the search tolerance), and a PGD audit of every point the cascade
certifies (timed, beside the cascade's seconds).

``--synthetic``: only the audit's cost against the certification's, at 6C2F on synthetic
CIFAR-shaped data (``bench/audit_cost.py``).

    python -m bench.certify_throughput [--model results/mnist5k/calibrate/model.pt] [--n 500]
    python -m bench.certify_throughput --synthetic --n 16
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List

import torch

from bench._common import (REPO, add_model_args, interleaved, machine_info, model_from_args, parser, ratios,
                           set_threads, spread, write_result)

TARGET_SPEEDUP = 20.0  # cascade vs one probabilistic level for every point
TARGET_RADIUS_SPEEDUP = 10.0
MIN_AGREEMENT = 0.995


def _load(args):
    """(model, x, y, cfg, info): a pipeline checkpoint (``--model``) or ``model_from_args``."""
    if not args.model:
        return model_from_args(args)
    from locallip.data.splits import load_splits, to_tensors
    from locallip.nn.checkpoint import load_model
    from locallip.foundation.compose import compose

    path = Path(args.model)
    model, ck = load_model(path)
    experiment = ck.get("experiment") or args.experiment
    splits = load_splits(Path(args.data) if args.data else path.parents[1] / "data" / "splits.npz")
    x, y = to_tensors(splits.test_x, splits.test_y)
    cfg = compose(experiment, config_dir=REPO / "config")
    info = {"source": str(path), "experiment": experiment, "epoch": ck.get("epoch"), "train": ck.get("train"),
            "calibration": ck.get("calibration"), "arch": model.spec.get("arch"),
            "activation": model.spec.get("activation")}
    return model, x, y, cfg, info


def _certify_all(model, x, y, radii, g, cc, cascade: bool) -> Dict[float, object]:
    from locallip.certify import certify
    from locallip.certify.split import batches, level_settings

    settings = replace(level_settings(cc, str(cc.guarantee)), cascade=cascade)
    g.vectors = None  # the cascade's warm starts are part of its cost (once per run, as in the stage)
    out = {}
    for r in radii:
        parts = []
        for start, gen in batches(x.shape[0], cc.batch_size, cc.seed):
            parts.append(certify(model, x[start:start + cc.batch_size], y[start:start + cc.batch_size], r, "local",
                                 settings, generator=gen, global_result=g))
        out[r] = {"certified": torch.cat([c.certified for c in parts]), "step": torch.cat([c.step for c in parts]),
                  "deterministic": torch.cat([c.deterministic for c in parts])}
    return out


def _radii_all(model, x, y, g, cc, max_radius: float, rtol: float, cascade: bool, batch: int) -> torch.Tensor:
    from locallip.certify import certified_radius
    from locallip.certify.split import batches, level_settings

    settings = replace(level_settings(cc, str(cc.guarantee)), cascade=cascade)
    g.vectors = None
    out = []
    for start, gen in batches(x.shape[0], batch, cc.seed):
        out.append(certified_radius(model, x[start:start + batch], y[start:start + batch], settings,
                                    max_radius=max_radius, rtol=rtol, generator=gen, global_result=g))
    return torch.cat(out)


def _audit(model, x, y, res, cc) -> Dict[str, object]:
    """The certify stage's audit (``certify.attack``, float32 search) of every certified point, timed."""
    from locallip.attack import audit_l2

    checked = broken = 0
    stats = {"passes": 0}
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for r, v in res.items():
        idx = v["certified"].nonzero().squeeze(1)
        if r <= 0 or not idx.numel():
            continue
        with torch.enable_grad():
            m = audit_l2(model, x[idx], y[idx], r, cc.attack, generator=gen, work_dtype=torch.float32, stats=stats)
        checked += int(idx.numel())
        broken += int((m <= 0).sum())
    return {"method": str(cc.attack.method), "checked": checked, "broken": broken, "passes": stats["passes"],
            "seconds": time.perf_counter() - t0}


def _compare(s: dict, f: dict) -> dict:
    """One radius: single level (s) against the cascade (f), point by point."""
    steps = {name: int(((f["step"] == i) & f["certified"]).sum()) for i, name in
             enumerate(("global", "box", "exact", "probabilistic", "estimate"))}
    cert = int(f["certified"].sum())
    return {
        "certified_single_level": float(s["certified"].double().mean()),
        "certified_cascade": float(f["certified"].double().mean()),
        "agreement": float((s["certified"] == f["certified"]).double().mean()),
        "cascade_only": int((f["certified"] & ~s["certified"]).sum()),
        "single_level_only": int((s["certified"] & ~f["certified"]).sum()),
        "cascade_steps": steps,
        "deterministic_share": float(f["deterministic"][f["certified"]].double().mean()) if cert else None,
    }


def _targets(speed, rspeed, per_radius, radius_cmp, audit) -> dict:
    return {
        "speedup": {"target_min": TARGET_SPEEDUP, "median": speed["median"], "met": speed["median"] >= TARGET_SPEEDUP},
        "at_least_as_many": {"met": all(v["certified_cascade"] >= v["certified_single_level"]
                                        for v in per_radius.values())},
        "agreement": {"target_min": MIN_AGREEMENT, "min": min(v["agreement"] for v in per_radius.values()),
                      "met": min(v["agreement"] for v in per_radius.values()) >= MIN_AGREEMENT},
        "audit": {"broken": audit["broken"], "met": audit["broken"] == 0},
        "radius_speedup": {"target_min": TARGET_RADIUS_SPEEDUP, "median": rspeed["median"],
                           "met": rspeed["median"] >= TARGET_RADIUS_SPEEDUP},
        "radii_not_smaller": {"met": radius_cmp["smaller_beyond_tolerance"] == 0}}


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--model", help="a pipeline checkpoint (e.g. results/mnist5k/calibrate/model.pt)")
    p.add_argument("--data", help="its splits file (default: <experiment dir>/data/splits.npz)")
    p.add_argument("--experiment", default="mnist5k", help="config of the certify settings (default: the checkpoint's)")
    p.add_argument("--n", type=int, default=None, help="test points (default 500, --quick 64)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--synthetic", action="store_true",
                   help="only the audit's cost: 6C2F on synthetic CIFAR-shaped data (bench/audit_cost.py)")
    p.add_argument("--factors", type=float, nargs="+", default=None,
                   help="--synthetic: radii as multiples of the median global certified radius (default 1 2; "
                        "x2's certification is the slow part)")
    add_model_args(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.synthetic:
        from bench.audit_cost import run as audit_cost

        return audit_cost(args)
    n = args.n or (64 if args.quick else 500)
    rounds = args.rounds or (1 if args.quick else 2)
    info = machine_info()
    model, x_all, y_all, cfg, model_info = _load(args)
    cc = cfg.certify
    radii: List[float] = [float(r) for r in cc.radii]
    max_radius = float(cfg.curve.max_radius or 2 * max(radii))
    dtype = torch.float64 if cc.dtype == "float64" else torch.float32
    model = model.to(dtype).eval()
    x, y = x_all[:n].to(dtype), y_all[:n]

    from locallip.bounds import global_bound

    g = global_bound(model, method="guaranteed")
    res: Dict[str, object] = {}

    def runner(name, fn):
        def run():
            res[name] = fn()
        return run

    variants = {
        "single_level": runner("single_level", lambda: _certify_all(model, x, y, radii, g, cc, cascade=False)),
        "cascade": runner("cascade", lambda: _certify_all(model, x, y, radii, g, cc, cascade=True)),
        "radius_single_level": runner("radius_single_level",
                                      lambda: _radii_all(model, x, y, g, cc, max_radius, cfg.curve.tol, False,
                                                         cc.batch_size)),
        "radius_cascade": runner("radius_cascade",
                                 lambda: _radii_all(model, x, y, g, cc, max_radius, cfg.curve.tol, True,
                                                    cfg.curve.batch_size)),
    }
    print(f"[certify_throughput] {n} test points, radii {radii}, {rounds} rounds; curve up to {max_radius:g}",
          flush=True)
    times = interleaved(variants, rounds=rounds, per_round=1, warmup=0)
    slow, fast = res["single_level"], res["cascade"]
    per_radius = {repr(r): _compare(slow[r], fast[r]) for r in radii}
    r_slow, r_fast = res["radius_single_level"], res["radius_cascade"]
    worse = r_fast < r_slow * (1 - cfg.curve.tol)
    radius_cmp = {"points": n, "smaller_beyond_tolerance": int(worse.sum()),
                  "ratio_cascade_over_single": spread((r_fast[r_slow > 0] / r_slow[r_slow > 0]).tolist()),
                  "mean_single_level": float(r_slow.mean()), "mean_cascade": float(r_fast.mean())}
    audit = _audit(model, x, y, fast, cc)
    speed, rspeed = ratios(times, "single_level", "cascade"), ratios(times, "radius_single_level", "radius_cascade")
    n_evals = n * len(radii)
    data = {
        "quick": args.quick, "machine": info, "model": model_info, "n": n, "radii": radii, "dtype": str(dtype),
        "batch_size": cc.batch_size, "max_radius": max_radius, "curve_tol": cfg.curve.tol,
        "seconds": {k: spread(v) for k, v in times.items()},
        "samples_per_s": {k: spread([n_evals / t for t in v]) for k, v in times.items() if "radius" not in k},
        "speedup_cascade": speed, "speedup_radius_cascade": rspeed,
        "per_radius": per_radius, "radii_comparison": radius_cmp, "audit_of_cascade_certificates": audit,
        "targets": _targets(speed, rspeed, per_radius, radius_cmp, audit),
    }
    sps = data["samples_per_s"]
    print(f"  single level: {sps['single_level']['median']:.1f} samples/s; cascade: {sps['cascade']['median']:.1f} "
          f"samples/s ({speed['median']:.1f}x)")
    for r, v in per_radius.items():
        print(f"  r={r}: certified {v['certified_single_level']:.4f} -> {v['certified_cascade']:.4f}, agreement "
              f"{v['agreement']:.4f}, steps {v['cascade_steps']}, deterministic {v['deterministic_share']}")
    print(f"  certified_radius: {rspeed['median']:.1f}x faster; smaller beyond tolerance: "
          f"{radius_cmp['smaller_beyond_tolerance']}; audit {audit['broken']}/{audit['checked']} broken "
          f"in {audit['seconds']:.1f}s (cascade certification {times['cascade'][-1]:.1f}s)")
    write_result("certify_throughput", data, args.out)
    return data


if __name__ == "__main__":
    main()
