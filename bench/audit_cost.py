"""The attack audit's cost against the certification's, at 6C2F on synthetic CIFAR-shaped data.

Run through ``python -m bench.certify_throughput --synthetic [--n 16] [--threads 1]``.

Model: the cifar10 experiment's 6C2F (its activation, normalization and certify settings) after
``STEPS`` Adam steps of cross-entropy on synthetic data: ten fixed prototype images in
[0, 1]^(3x32x32) plus Gaussian noise (0.3), clipped. A few CPU seconds of training cannot make a
robust CIFAR model, so the radii are set relative to the model's own global certified radius
(its median over the test points, x1 and x2): at x1 the global step decides about half of the
points, at x2 the box and masked steps do the work, as on a trained model.

Per radius, as the certify stage does: the cascade certifies the points in batches of
``certify.batch_size`` (timed), then each audit attacks every certified point with
``certify.attack``'s steps, restarts and step size (float32 search): the margin attack (the
audit's default) and the older PGD, both timed, with their passes through the model and the
points they break (0 expected: the certificates are sound). Writes
``bench/results/certify_throughput_audit.json``.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Dict, List

import torch
import torch.nn.functional as F

from bench._common import REPO, machine_info, spread, write_result

STEPS = 30  # Adam steps of cross-entropy, batch 32
RADIUS_FACTORS = (1.0, 2.0)  # x the median global certified radius
METHODS = ("margin", "pgd")


def _synthetic_model(n: int):
    """(model in float64, x, y, cfg): 6C2F trained briefly on prototype images plus noise."""
    from locallip.foundation.compose import compose
    from locallip.nn.models import build_model

    cfg = compose("cifar10", config_dir=REPO / "config")
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.rand(10, 3, 32, 32, generator=gen)

    def data(k):
        y = torch.randint(0, 10, (k,), generator=gen)
        return (prototypes[y] + 0.3 * torch.randn(k, 3, 32, 32, generator=gen)).clamp(0, 1), y

    torch.manual_seed(0)
    model = build_model("6c2f", cfg.model.activation, (3, 32, 32), 10, cfg.model.theta_init, cfg.dataset.mean,
                        cfg.dataset.std)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(STEPS):
        xb, yb = data(32)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    x, y = data(n)
    return model.double().eval(), x.double(), y, cfg


def _certify(model, x, y, r, g, cc) -> Dict[str, object]:
    """The cascade at radius r in the stage's batches: seconds and the certified points."""
    from locallip.certify import certify
    from locallip.certify.split import batches, level_settings

    settings = level_settings(cc, str(cc.guarantee))
    t0 = time.perf_counter()
    certified = torch.cat([certify(model, x[s:s + cc.batch_size], y[s:s + cc.batch_size], r, "local", settings,
                                   generator=gen, global_result=g).certified
                           for s, gen in batches(x.shape[0], cc.batch_size, cc.seed)])
    return {"seconds": time.perf_counter() - t0, "certified": certified}


def _attack(model, x, y, r, attack) -> Dict[str, object]:
    from locallip.attack import audit_l2

    stats = {"passes": 0}
    t0 = time.perf_counter()
    with torch.enable_grad():
        m = audit_l2(model, x, y, r, attack, generator=torch.Generator().manual_seed(0), work_dtype=torch.float32,
                     stats=stats)
    return {"seconds": time.perf_counter() - t0, "passes": stats["passes"], "broken": int((m <= 0).sum()),
            "checked": int(x.shape[0])}


def run(args) -> dict:
    from locallip.bounds import global_bound
    from locallip.certify.radius import global_certified_radius

    n = args.n or 16
    info = machine_info()
    model, x, y, cfg = _synthetic_model(n)
    cc = cfg.certify
    g = global_bound(model, method="guaranteed", input_shape=(3, 32, 32))
    with torch.no_grad():
        median_global = float(global_certified_radius(model, x, y, g.lipschitz).median())
    rows: List[dict] = []
    for factor in RADIUS_FACTORS:
        r = factor * median_global
        cert = _certify(model, x, y, r, g, cc)
        idx = cert["certified"].nonzero().squeeze(1)
        row = {"radius": r, "factor": factor, "certified": int(idx.numel()), "certification_s": cert["seconds"]}
        for method in METHODS:
            a = _attack(model, x[idx], y[idx], r, replace(cc.attack, method=method)) if idx.numel() else None
            row[method] = a
            if a:
                row[f"{method}_over_certification"] = a["seconds"] / cert["seconds"]
        rows.append(row)
        print(f"  r={r:.4g} ({factor:g}x median global radius): {row['certified']}/{n} certified in "
              f"{cert['seconds']:.1f}s; " + "; ".join(
                  f"{m} audit {row[m]['seconds']:.1f}s ({row[m]['passes']} passes, {row[m]['broken']} broken)"
                  for m in METHODS if row[m]), flush=True)
    total = {k: sum(r[k]["seconds"] for r in rows if r[k]) for k in METHODS}
    total["certification"] = sum(r["certification_s"] for r in rows)
    data = {"machine": info, "model": {"arch": "6c2f", "data": "synthetic prototypes + noise", "train_steps": STEPS},
            "n": n, "batch_size": cc.batch_size, "attack": {k: str(v) for k, v in vars(cc.attack).items()},
            "median_global_radius": median_global, "per_radius": rows, "seconds": total,
            "ratio_over_certification": {m: total[m] / total["certification"] for m in METHODS},
            "per_certified_point_s": {m: spread([r[m]["seconds"] / r["certified"] for r in rows if r[m]])
                                      for m in METHODS},
            "targets": {"audit_at_most_certification": {"target_max": 1.0,
                                                       "ratio": total["margin"] / total["certification"],
                                                       "met": total["margin"] <= total["certification"]}}}
    print(f"  total: certification {total['certification']:.1f}s, margin audit {total['margin']:.1f}s "
          f"({data['ratio_over_certification']['margin']:.2f}x), PGD audit {total['pgd']:.1f}s "
          f"({data['ratio_over_certification']['pgd']:.2f}x)")
    write_result("certify_throughput_audit", data, args.out)
    return data
