"""The attack audit's cost against the certification's, at 6C2F on synthetic CIFAR-shaped data.

Run through ``python -m bench.certify_throughput --synthetic [--n 16] [--threads 1]``.

Model: the cifar10 experiment's 6C2F (its activation, normalization and certify settings) after
``STEPS`` Adam steps of cross-entropy on synthetic data: ten fixed prototype images in
[0, 1]^(3x32x32) plus Gaussian noise (0.3), clipped. A few CPU seconds of training cannot make a
robust CIFAR model, so the radii are set relative to the model's own global certified radius
(its median over the test points, x1 and x2): at x1 the global step decides about half of the
points, at x2 the box and masked steps do the work, as on a trained model.

Per radius, as the certify stage does: the cascade certifies the points in batches of
``certify.batch_size`` (timed per batch), then the margin attack (``certify.attack``'s steps, restarts
and step size, float32 search) audits the same certified points two ways: the full audit (budget
None: every certified point, in one call) and the audit within ``BUDGET`` x the certification's
seconds (``locallip.certify.split.budgeted_audit`` batch by batch: a seeded random subset, each
point attacked fully, one probe point first). Both timed, with their passes through the model, the
points audited and the points broken (0 expected: the certificates are sound). Writes
``bench/results/certify_throughput_audit.json``. (The older PGD's figures, before the margin
attack, are in bench/README.md.)
"""
from __future__ import annotations

import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from bench._common import REPO, machine_info, spread, write_result

STEPS = 30  # Adam steps of cross-entropy, batch 32
RADIUS_FACTORS = (1.0, 2.0)  # x the median global certified radius
AUDITS = ("full", "budget")  # every certified point; within BUDGET x the certification's seconds
BUDGET = 1.0  # certify.attack.budget of the cifar10 experiment


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
    """The cascade at radius r in the stage's batches: seconds (in all and per batch) and the certified points."""
    from locallip.certify import certify
    from locallip.certify.split import batches, level_settings

    settings = level_settings(cc, str(cc.guarantee))
    per_batch, certified = [], []
    for s, gen in batches(x.shape[0], cc.batch_size, cc.seed):
        t0 = time.perf_counter()
        certified.append(certify(model, x[s:s + cc.batch_size], y[s:s + cc.batch_size], r, "local", settings,
                                 generator=gen, global_result=g).certified)
        per_batch.append((s, time.perf_counter() - t0))
    return {"seconds": sum(t for _, t in per_batch), "per_batch": per_batch, "certified": torch.cat(certified)}


def _attack(model, x, y, r, attack) -> Dict[str, object]:
    """The full audit (no budget): every certified point of the radius, all in one call."""
    from locallip.attack import audit_l2

    stats = {"passes": 0}
    t0 = time.perf_counter()
    with torch.enable_grad():
        m = audit_l2(model, x, y, r, attack, generator=torch.Generator().manual_seed(0), work_dtype=torch.float32,
                     stats=stats)
    return {"seconds": time.perf_counter() - t0, "passes": stats["passes"], "broken": int((m <= 0).sum()),
            "checked": int(x.shape[0]), "robust": int(x.shape[0])}


def _budgeted(model, x, y, r, attack, cert, budget: float, batch_size: int) -> Dict[str, object]:
    """The audit within ``budget`` x the certification's seconds, batch by batch as the certify stage runs it
    (``locallip.certify.split.budgeted_audit``: its allowance grows by each batch's certification seconds)."""
    from locallip.attack import audit_l2
    from locallip.certify.split import budgeted_audit

    part = {"seconds": {"certification": 0.0, "audit": 0.0, "audit_probe": 0.0}, "audited": 0}
    stats, broken = {"passes": 0}, [0]
    for start, seconds in cert["per_batch"]:
        part["seconds"]["certification"] += seconds
        t0 = time.perf_counter()
        idx = start + cert["certified"][start:start + batch_size].nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(start)

        def attack_points(chosen):
            with torch.enable_grad():
                m = audit_l2(model, x[chosen], y[chosen], r, attack, generator=gen, work_dtype=torch.float32,
                             stats=stats)
            part["audited"] += int(chosen.numel())
            broken[0] += int((m <= 0).sum())

        if idx.numel():
            budgeted_audit(idx, budget, gen, part, t0, attack_points)
        part["seconds"]["audit"] += time.perf_counter() - t0
    return {"seconds": part["seconds"]["audit"], "probe_s": part["seconds"]["audit_probe"], "passes": stats["passes"],
            "broken": broken[0], "checked": part["audited"], "robust": int(cert["certified"].sum())}


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
    for factor in args.factors or RADIUS_FACTORS:
        r = factor * median_global
        cert = _certify(model, x, y, r, g, cc)
        idx = cert["certified"].nonzero().squeeze(1)
        row = {"radius": r, "factor": factor, "certified": int(idx.numel()), "certification_s": cert["seconds"]}
        if idx.numel():
            row["full"] = _attack(model, x[idx], y[idx], r, cc.attack)
            row["budget"] = _budgeted(model, x, y, r, cc.attack, cert, BUDGET, cc.batch_size)
            for k in AUDITS:
                row[f"{k}_over_certification"] = row[k]["seconds"] / cert["seconds"]
        rows.append(row)
        print(f"  r={r:.4g} ({factor:g}x median global radius): {row['certified']}/{n} certified in "
              f"{cert['seconds']:.1f}s; " + "; ".join(
                  f"{k} audit {row[k]['seconds']:.1f}s ({row[k]['checked']}/{row[k]['robust']} audited, "
                  f"{row[k]['passes']} passes, {row[k]['broken']} broken)" for k in AUDITS if k in row), flush=True)
    total = {k: sum(r[k]["seconds"] for r in rows if k in r) for k in AUDITS}
    total["certification"] = sum(r["certification_s"] for r in rows)
    ratio = {k: total[k] / total["certification"] for k in AUDITS}
    data = {"machine": info, "model": {"arch": "6c2f", "data": "synthetic prototypes + noise", "train_steps": STEPS},
            "n": n, "radius_factors": list(args.factors or RADIUS_FACTORS), "batch_size": cc.batch_size, "attack": {k: str(v) for k, v in vars(cc.attack).items()},
            "budget": BUDGET, "median_global_radius": median_global, "per_radius": rows, "seconds": total,
            "ratio_over_certification": ratio,
            "per_audited_point_s": {k: spread([r[k]["seconds"] / r[k]["checked"] for r in rows if k in r])
                                    for k in AUDITS},
            "targets": {"audit_at_most_certification": {
                "target_max": 1.0, "full": [r.get("full_over_certification") for r in rows],
                "budget": [r.get("budget_over_certification") for r in rows],
                "met": all(r["budget"]["seconds"] <= BUDGET * r["certification_s"] + r["budget"]["probe_s"]
                           for r in rows if "budget" in r)}}}
    print(f"  total: certification {total['certification']:.1f}s, full audit {total['full']:.1f}s "
          f"({ratio['full']:.2f}x), audit with budget {BUDGET:g} {total['budget']:.1f}s ({ratio['budget']:.2f}x)")
    write_result("certify_throughput_audit", data, args.out)
    return data
