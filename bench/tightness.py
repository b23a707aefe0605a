"""Tightness of the local bound on a trained mnist5k model, at its training radius.

Per test point (float64 model, the certification settings of ``config/certify``):
  local      ``local_bound`` (Lanczos to certify.tol from a random start): the local
             Lipschitz bound of the penultimate features on B(x, eps)
  global     ``global_bound(method="guaranteed")`` (exact SVD / FFT upper bound)
  empirical  ``empirical_lipschitz``: the largest exact Jacobian spectral norm found by
             random sampling + gradient ascent inside the ball (a *lower* bound of the
             true local constant)
Reports the median (and quartiles) of local/global and local/empirical. Target:
median local/empirical <= 1.5. Every local bound must be >= its empirical lower bound.

    python -m bench.tightness [--quick] [--n 100] [--train]
"""
from __future__ import annotations

import time

from bench._common import add_model_args, machine_info, model_from_args, parser, set_threads, spread, write_result

import torch

TARGET_LOCAL_OVER_EMPIRICAL = 1.5


def measure(model, x, eps: float, cc, samples: int, ascent_steps: int, chunk: int = 50) -> dict:
    from locallip.bounds import global_bound, local_bound
    from locallip.bounds.empirical import empirical_lipschitz, jacobian_norm

    g = global_bound(model, method="guaranteed")
    gen = torch.Generator().manual_seed(cc.seed)
    local, emp, conv, local0, jac0 = [], [], [], [], []
    t_local = t_emp = 0.0
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk]
        t0 = time.perf_counter()
        with torch.no_grad():
            lb = local_bound(model, xb, eps, guarantee=str(cc.guarantee), max_iter=cc.max_iter, tol=cc.tol,
                             generator=gen, work_dtype=torch.float32, method=str(cc.method))
        t1 = time.perf_counter()
        e = empirical_lipschitz(model, xb, eps, samples=samples, ascent_steps=ascent_steps,
                                generator=torch.Generator().manual_seed(s))
        t2 = time.perf_counter()
        with torch.no_grad():  # decomposition: the same bound at radius 0 (masks of x only), and ||J(x)||
            lb0 = local_bound(model, xb, 0.0, guarantee=str(cc.guarantee), max_iter=cc.max_iter, tol=cc.tol,
                              generator=gen, work_dtype=torch.float32, method=str(cc.method))
        local0.append(lb0.lipschitz)
        jac0.append(jacobian_norm(model, xb))
        t_local += t1 - t0
        t_emp += t2 - t1
        local.append(lb.lipschitz)
        emp.append(e)
        conv.append(lb.converged)
    local, emp, conv = torch.cat(local), torch.cat(emp), torch.cat(conv)
    local0, jac0 = torch.cat(local0), torch.cat(jac0)
    K = float(g.lipschitz)
    violations = int((local < emp).sum())
    return {
        "eps": eps, "n": int(x.shape[0]), "global_lipschitz": K, "global_guarantee": g.guarantee,
        "local_over_global": spread((local / K).tolist()),
        "local_over_empirical": spread((local / emp).tolist()),
        "empirical_over_global": spread((emp / K).tolist()),
        "local": spread(local.tolist()), "empirical": spread(emp.tolist()),
        # local/empirical = (local / local_at_0) * (local_at_0 / ||J(x)||) * (||J(x)|| / empirical):
        # masks lost to the ball  x  product of layer norms vs the norm of their product  x  search gain
        "decomposition": {
            "local_over_local_at_radius0": spread((local / local0).tolist()),
            "local_at_radius0_over_jacobian_at_x": spread((local0 / jac0).tolist()),
            "jacobian_at_x_over_empirical": spread((jac0 / emp).tolist()),
        },
        "local_not_converged": int((~conv).sum()),
        "local_below_empirical": violations,  # must be 0: the local bound is an upper bound
        "time_s": {"local": t_local, "empirical": t_emp},
    }


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="test points (default 100, --quick 10)")
    p.add_argument("--samples", type=int, default=None, help="random points per ball (default 32, --quick 8)")
    p.add_argument("--ascent-steps", type=int, default=None, help="gradient-ascent steps (default 20, --quick 5)")
    add_model_args(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    n = args.n or (10 if args.quick else 100)
    samples = args.samples or (8 if args.quick else 32)
    steps = args.ascent_steps if args.ascent_steps is not None else (5 if args.quick else 20)
    info = machine_info()
    model, x_all, _, cfg, model_info = model_from_args(args)
    tc = model_info.get("train") or {"eps": cfg.train.eps, "eps_train": cfg.train.eps_train}
    cc = cfg.certify
    model = model.double().eval()
    x = x_all[:n].double()
    radii = {"eps_train": float(tc["eps_train"]), "eps": float(tc["eps"])}
    out = {}
    for label, eps in radii.items():
        r = measure(model, x, eps, cc, samples, steps)
        out[label] = r
        print(f"[tightness] eps {eps:g} ({label}), n {n}: local/global median {r['local_over_global']['median']:.3f}, "
              f"local/empirical median {r['local_over_empirical']['median']:.3f} "
              f"(q1 {r['local_over_empirical']['q1']:.3f}, q3 {r['local_over_empirical']['q3']:.3f}); "
              f"local < empirical: {r['local_below_empirical']}", flush=True)
        if r["local_below_empirical"]:
            print("[tightness] WARNING: a local bound is below its empirical lower bound -- a soundness bug")
    main_r = out["eps_train"]
    data = {"quick": args.quick, "machine": info, "model": model_info, "n": n,
            "certify_settings": {"guarantee": str(cc.guarantee), "method": str(cc.method), "tol": cc.tol,
                                 "max_iter": cc.max_iter},
            "empirical_settings": {"samples": samples, "ascent_steps": steps},
            "training_radius": radii["eps_train"], "radii": out,
            "targets": {"local_over_empirical": {"target_max": TARGET_LOCAL_OVER_EMPIRICAL,
                                                 "median": main_r["local_over_empirical"]["median"],
                                                 "met": main_r["local_over_empirical"]["median"]
                                                 <= TARGET_LOCAL_OVER_EMPIRICAL},
                        "sound": {"local_below_empirical": sum(r["local_below_empirical"] for r in out.values()),
                                  "met": all(r["local_below_empirical"] == 0 for r in out.values())}}}
    write_result("tightness", data, args.out)
    return data


if __name__ == "__main__":
    main()
