"""Certification throughput of the three guarantee levels against the reference settings.

Reference = the reference codebase's setting: a fixed 2000 power iterations per layer from
a random start (``certify(..., guarantee="estimate", method="power", tol=0.0,
max_iter=2000)``). Levels = ``certify(..., guarantee=...)`` with the certify stage's
defaults: ``probabilistic`` (plain Lanczos, Kuczynski-Wozniakowski inflation, P(false)
<= 1e-9 per point), ``exact`` (explicit Gram matrix and a Cholesky proof) and
``estimate`` (restarted Lanczos to tol). All run on the same test points of a trained
``mnist5k`` model (float64 model, float32 iterations, batches of
``certify.batch_size``, the guaranteed global bound computed once outside the timed
region, exactly as the certify stage does), interleaved round by round. Reports
samples/s of each, the speed-up over the reference per round, and each level's
certified accuracy (the probabilistic one must be within 1 point of the estimate).

Also checks that ``tol=0`` runs exactly ``max_iter`` iterations in
``masked_operator_norm`` (by counting operator applications).

    python -m bench.certify_throughput [--quick] [--n 300] [--train]
"""
from __future__ import annotations

from typing import Dict

from bench._common import (add_model_args, interleaved, machine_info, model_from_args, parser, ratios, set_threads,
                           spread, write_result)

import torch

TARGET_SPEEDUP = 10.0  # probabilistic level vs the reference
MAX_ACC_GAP_POINTS = 1.0  # probabilistic vs estimate
REFERENCE = {"guarantee": "estimate", "method": "power", "tol": 0.0, "max_iter": 2000}


def check_fixed_iterations(model, x: torch.Tensor, eps: float, max_iter: int = REFERENCE["max_iter"]) -> dict:
    """Count operator applications of a tol=0 power iteration: must be exactly max_iter per layer."""
    from locallip import bounds

    counts = {"linear": 0, "transpose": 0}
    orig_linear, orig_transpose = bounds.AffineOp.linear, bounds.AffineOp.transpose

    def linear(self, v):
        counts["linear"] += 1
        return orig_linear(self, v)

    def transpose(self, u):
        counts["transpose"] += 1
        return orig_transpose(self, u)

    bounds.AffineOp.linear, bounds.AffineOp.transpose = linear, transpose
    try:
        with torch.no_grad():
            lb = bounds.local_bound(model, x, eps, guarantee="estimate", method="power", tol=0.0, max_iter=max_iter,
                                    generator=torch.Generator().manual_seed(0), work_dtype=torch.float32)
    finally:
        bounds.AffineOp.linear, bounds.AffineOp.transpose = orig_linear, orig_transpose
    layers = len(lb.iterations)
    # per layer: max_iter applications of A and A^T, plus one final ||A v|| in the model's dtype
    ok = (all(i == max_iter for i in lb.iterations) and counts["transpose"] == layers * max_iter
          and counts["linear"] == layers * (max_iter + 1) and bool(lb.converged.all()))
    out = {"max_iter": max_iter, "layers": layers, "reported_iterations": list(lb.iterations),
           "A_applications": counts["linear"], "AT_applications": counts["transpose"],
           "expected_A": layers * (max_iter + 1), "expected_AT": layers * max_iter, "ok": ok}
    if not ok:
        raise AssertionError(f"tol=0 did not run exactly max_iter iterations: {out}")
    return out


def _layer_macs(op) -> int:
    """Multiply-adds of one application of the layer's operator to one sample."""
    from torch import nn

    layer = op.layer
    if isinstance(layer, nn.Conv2d):
        c, kh, kw = layer.in_channels, *layer.kernel_size
        return int(torch.Size(op.out_shape).numel()) * c * kh * kw
    return layer.in_features * layer.out_features


def operator_work(model, x, y, eps, g, batch: int, seed: int, settings: dict) -> dict:
    """Sample-applications of A and A^T per layer in one certification pass, and the MAC-weighted total.

    The ratio of the weighted totals (reference / fast) is the speed-up certification would
    have if applying the masked operators were its only cost.
    """
    from locallip import bounds

    rows: Dict[int, list] = {}
    orig_linear, orig_transpose = bounds.AffineOp.linear, bounds.AffineOp.transpose

    def count(op, n):
        key = id(op.layer)
        if key not in rows:
            rows[key] = [0, _layer_macs(op)]
        rows[key][0] += n

    def linear(self, v):
        count(self, v.shape[0])
        return orig_linear(self, v)

    def transpose(self, u):
        count(self, u.shape[0])
        return orig_transpose(self, u)

    bounds.AffineOp.linear, bounds.AffineOp.transpose = linear, transpose
    try:
        certify_all(model, x, y, eps, g, batch, seed, **settings)
    finally:
        bounds.AffineOp.linear, bounds.AffineOp.transpose = orig_linear, orig_transpose
    layers = list(rows.values())
    return {"sample_applications_per_layer": [r[0] for r in layers],
            "mean_applications_per_sample_per_layer": [r[0] / (2 * x.shape[0]) for r in layers],
            "macs_per_application_per_layer": [r[1] for r in layers],
            "weighted_macs": sum(r[0] * r[1] for r in layers)}


def certify_all(model, x, y, eps, g, batch: int, seed: int, **kw) -> Dict[str, object]:
    from locallip.certify import certify

    gen = torch.Generator().manual_seed(seed)
    certified, bounds_, conv, iters = [], [], [], []
    for s in range(0, x.shape[0], batch):
        c = certify(model, x[s:s + batch], y[s:s + batch], eps, "local", generator=gen, global_result=g, **kw)
        certified.append(c.certified)
        bounds_.append(c.bound)
        conv.append(c.converged)
        iters.append(list(c.iterations))
    return {"certified": torch.cat(certified), "bound": torch.cat(bounds_), "converged": torch.cat(conv),
            "iterations": iters}


def profile_fast(model, x, y, eps, g, seed: int, fast: dict, top: int = 10) -> dict:
    """torch.profiler over one batch of the fast certification: where its time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        certify_all(model, x, y, eps, g, x.shape[0], seed, **fast)
    avgs = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in avgs)
    rows = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"batch": int(x.shape[0]), "self_cpu_s_total": total / 1e6,
            "top_ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6,
                         "share": e.self_cpu_time_total / max(total, 1e-9), "calls": e.count} for e in rows]}


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="test points (default 300, --quick 64)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--no-exact", action="store_true", help="leave the exact level out (it is the slowest)")
    add_model_args(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    n = args.n or (64 if args.quick else 300)
    rounds = args.rounds or (1 if args.quick else 3)
    info = machine_info()
    model, x_all, y_all, cfg, model_info = model_from_args(args)
    cc = cfg.certify
    eps = float((model_info.get("train") or {"eps": cfg.train.eps})["eps"])
    dtype = torch.float64 if cc.dtype == "float64" else torch.float32
    model = model.to(dtype).eval()
    x, y = x_all[:n].to(dtype), y_all[:n]
    batch = cc.batch_size
    base = {"delta": cc.delta, "inflation": cc.inflation, "steps": cc.steps, "method": str(cc.method),
            "tol": cc.tol, "max_iter": cc.max_iter}
    levels = ["probabilistic", "estimate"] + ([] if args.no_exact else ["exact"])
    settings = {lv: dict(base, guarantee=lv) for lv in levels}
    settings["reference"] = REFERENCE

    from locallip.bounds import global_bound

    iteration_check = check_fixed_iterations(model, x[:4], eps)
    print(f"[certify_throughput] tol=0 check: {iteration_check['A_applications']} applications of A over "
          f"{iteration_check['layers']} layers (expected {iteration_check['expected_A']}): ok", flush=True)
    g = global_bound(model, method="guaranteed")
    results: Dict[str, dict] = {}

    def runner(name, kw):
        def run():
            results[name] = certify_all(model, x, y, eps, g, batch, cc.seed, **kw)
        return run

    print(f"[certify_throughput] {n} test points, eps {eps}, {rounds} rounds; levels {levels}, reference {REFERENCE}",
          flush=True)
    times = interleaved({k: runner(k, kw) for k, kw in settings.items()}, rounds=rounds, per_round=1, warmup=0)
    work = {k: operator_work(model, x, y, eps, g, batch, cc.seed, settings[k]) for k in ("probabilistic", "reference")}
    work["operator_only_speedup"] = work["reference"]["weighted_macs"] / max(work["probabilistic"]["weighted_macs"], 1)
    ref_iters = {i for batch_iters in results["reference"]["iterations"] for i in batch_iters}
    assert ref_iters == {REFERENCE["max_iter"]}, f"reference ran {ref_iters} iterations, not {REFERENCE['max_iter']}"
    acc = {k: float(r["certified"].double().mean()) for k, r in results.items()}
    gap_points = abs(acc["probabilistic"] - acc["estimate"]) * 100
    speed = {lv: ratios(times, "reference", lv) for lv in levels}
    agree = {lv: float((results[lv]["certified"] == results["reference"]["certified"]).double().mean())
             for lv in levels}
    data = {
        "quick": args.quick, "machine": info, "model": model_info, "n": n, "eps": eps, "dtype": str(dtype),
        "batch_size": batch, "settings": settings,
        "seconds": {k: spread(v) for k, v in times.items()},
        "samples_per_s": {k: spread([n / t for t in v]) for k, v in times.items()},
        "speedup_over_reference": speed,
        "certified_acc": acc, "probabilistic_vs_estimate_gap_points": gap_points,
        "per_sample_agreement_with_reference": agree,
        "tol0_iteration_check": iteration_check,
        "operator_work": work,
        "targets": {"speedup": {"target_min": TARGET_SPEEDUP, "median": speed["probabilistic"]["median"],
                                "met": speed["probabilistic"]["median"] >= TARGET_SPEEDUP},
                    "accuracy_agreement": {"max_gap_points": MAX_ACC_GAP_POINTS, "gap_points": gap_points,
                                           "met": gap_points <= MAX_ACC_GAP_POINTS}},
    }
    if not args.quick:
        data["probabilistic_profile"] = profile_fast(model, x[:batch], y[:batch], eps, g, cc.seed,
                                                     settings["probabilistic"])
    sps = data["samples_per_s"]
    for k in settings:
        extra = f", {speed[k]['median']:.1f}x the reference" if k in speed else ""
        print(f"  {k}: {sps[k]['median']:.1f} samples/s{extra}; certified {acc[k]:.4f}")
    print(f"  operator work (MAC-weighted applications of A and A^T): reference / probabilistic = "
          f"{work['operator_only_speedup']:.1f}x")
    write_result("certify_throughput", data, args.out)
    return data


if __name__ == "__main__":
    main()
