"""Certification: the public API ``certify`` and the pipeline's certify stage.

A point is certified at radius eps when its prediction is the label and a lower
bound of every margin z_pred - z_j over the whole ball is strictly positive.
Ties (margin 0) and misclassified points are never certified.
"""
from __future__ import annotations

import csv
import io as _io
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from .bounds import (GUARANTEED, GlobalBound, global_bound, global_margins, local_bound, local_margins,
                     penultimate, worst_margin)

Tensor = torch.Tensor


@dataclass
class Certificate:
    prediction: Tensor  # [B] predicted class at x
    correct: Tensor  # [B] prediction == label
    robust: Tensor  # [B] every margin of the prediction provably > 0 on the ball
    certified: Tensor  # [B] robust and correct
    worst_margin: Tensor  # [B] lower bound of min_j (z_pred - z_j) on the ball
    bound: Tensor  # [B] Lipschitz bound of the penultimate features used
    converged: Tensor  # [B] power iteration converged (always True for the global bound)
    iterations: List[int]
    guarantee: str
    kind: str  # "local" | "global"


def local_guarantee(tol: float, max_iter: int, method: str = "lanczos") -> str:
    how = ("thick-restarted Lanczos from a random start, until the relative residual of the top Ritz pair is "
           f"<= {tol:g} (checked explicitly)" if method == "lanczos" else
           f"power iteration from a random start, until the relative residual of the Rayleigh quotient is "
           f"<= {tol:g}" + (" (tol 0: exactly max_iter iterations)" if tol <= 0 else ""))
    return (f"estimate: masked layer norms by {how} (at most {max_iter} operator applications per layer); "
            f"these approach each norm from below. Margins are never below the guaranteed global ones, and "
            f"points whose iteration did not converge use the global certificate")


def certify(model: nn.Module, x: Tensor, y: Tensor, eps: float, bound: str = "local", *,
            max_iter: int = 2000, tol: float = 1e-4, last_layer: str = "ball_box",
            generator: Optional[torch.Generator] = None,
            global_result: Optional[GlobalBound] = None,
            work_dtype: Optional[torch.dtype] = torch.float32, method: str = "lanczos") -> Certificate:
    """Certify each (x_b, y_b) at l2 radius ``eps`` with the local or the global bound.

    The global bound is the guaranteed upper bound (exact SVD / FFT). The local
    bound's margins are combined with the global ones (both are lower bounds of
    the true margin, so their maximum is too); where its power iteration did not
    converge, only the global margins count. Power iterations run in
    ``work_dtype`` (float32 by default); norms, bounds and margins are computed
    in the model's dtype (float64 recommended).
    """
    if bound not in ("local", "global"):
        raise ValueError(f"bound must be 'local' or 'global', got {bound!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match a batch of {x.shape[0]}")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        g = global_result or global_bound(model, method="guaranteed")
        features = penultimate(model, x)
        logits = model(x)
        pred = logits.argmax(dim=1)
        m_global = global_margins(model, logits, features, pred, g.lipschitz, eps)
        if bound == "global":
            margins = m_global
            k = g.lipschitz.expand(x.shape[0])
            converged = torch.ones_like(pred, dtype=torch.bool)
            iterations, guarantee = [], g.guarantee
        else:
            lb = local_bound(model, x, eps, max_iter=max_iter, tol=tol, init="random", generator=generator,
                             work_dtype=work_dtype, method=method)
            m_local = local_margins(model, lb, pred, last_layer)
            converged = lb.converged
            margins = torch.where(converged[:, None], torch.maximum(m_local, m_global), m_global)
            k, iterations = lb.lipschitz, lb.iterations
            guarantee = local_guarantee(tol, max_iter, method)
    model.train(was_training)
    wm = worst_margin(margins, pred)
    correct = pred == y
    robust = wm > 0  # strictly: a tie is not certified
    return Certificate(prediction=pred, correct=correct, robust=robust, certified=robust & correct,
                       worst_margin=wm, bound=k, converged=converged, iterations=iterations,
                       guarantee=guarantee, kind=bound)


# --------------------------------------------------------------------------- certify stage


class AuditFailure(RuntimeError):
    """The attack broke a certified point: the bound or its implementation is wrong."""


def _device(name: str = "auto") -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def certify_dataset(model: nn.Module, x: Tensor, y: Tensor, radius: float, cfg: dict,
                    progress: bool = True) -> dict:
    """Certify a whole split with both bounds and audit the certified points by PGD.

    Returns a summary dict and the per-sample rows. ``cfg`` is the certify section.
    """
    from tqdm import tqdm

    from .attack import pgd_l2

    dtype = torch.float64 if cfg.get("dtype", "float64") == "float64" else torch.float32
    device = _device()
    model = model.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    g = global_bound(model, method="guaranteed")
    rows, t_local = [], 0.0
    batch = int(cfg.get("batch_size", 256))
    attack = cfg.get("attack", {})
    audited = broken = 0
    t0 = time.perf_counter()
    bar = tqdm(range(0, x.shape[0], batch), desc=f"certify r={radius:g}", disable=None if progress else True, unit="batch")
    for start in bar:
        xb = x[start:start + batch].to(device=device, dtype=dtype)
        yb = y[start:start + batch].to(device)
        t1 = time.perf_counter()
        loc = certify(model, xb, yb, radius, "local", max_iter=int(cfg["max_iter"]), tol=float(cfg["tol"]),
                      last_layer=cfg.get("last_layer", "ball_box"), generator=gen, global_result=g,
                      method=cfg.get("method", "lanczos"))
        t_local += time.perf_counter() - t1
        glo = certify(model, xb, yb, radius, "global", global_result=g)
        check = loc.robust | glo.robust
        attack_margin = torch.full((xb.shape[0],), float("nan"), dtype=dtype, device=device)
        if radius > 0 and bool(check.any()):
            idx = check.nonzero().squeeze(1)
            with torch.enable_grad():
                am = pgd_l2(model, xb[idx], loc.prediction[idx], radius, steps=int(attack.get("steps", 50)),
                            restarts=int(attack.get("restarts", 5)),
                            step_size=float(attack.get("step_size", 0.1)), generator=gen)
            attack_margin[idx] = am
            audited += int(idx.numel())
            broken += int((am <= 0).sum())
        for i in range(xb.shape[0]):
            rows.append({
                "index": start + i, "label": int(yb[i]), "prediction": int(loc.prediction[i]),
                "worst_margin_local": float(loc.worst_margin[i]), "worst_margin_global": float(glo.worst_margin[i]),
                "bound_local": float(loc.bound[i]), "bound_global": float(glo.bound[i]),
                "certified_local": bool(loc.certified[i]), "certified_global": bool(glo.certified[i]),
                "converged": bool(loc.converged[i]), "attack_margin": float(attack_margin[i]),
            })
        bar.set_postfix(cert=f"{sum(r['certified_local'] for r in rows) / len(rows):.3f}")
    n = len(rows)
    ratios = torch.tensor([r["bound_local"] / r["bound_global"] for r in rows], dtype=torch.float64)
    summary = {
        "radius": float(radius), "n": n,
        "clean_acc": sum(r["label"] == r["prediction"] for r in rows) / n,
        "certified_acc_local": sum(r["certified_local"] for r in rows) / n,
        "certified_acc_global": sum(r["certified_global"] for r in rows) / n,
        "median_bound_ratio": float(ratios.median()),
        "not_converged": sum(not r["converged"] for r in rows),
        "samples_per_s": n / max(t_local, 1e-9),
        "time_s": time.perf_counter() - t0,
        "device": str(device), "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "guarantee": {"local": local_guarantee(float(cfg["tol"]), int(cfg["max_iter"]), cfg.get("method", "lanczos")),
                      "global": GUARANTEED},
        "method": cfg.get("method", "lanczos"), "tol": float(cfg["tol"]), "max_iter": int(cfg["max_iter"]),
        "global_lipschitz": float(g.lipschitz),
        "attack": {"steps": int(attack.get("steps", 50)), "restarts": int(attack.get("restarts", 5)),
                   "checked": audited, "broken": broken},
    }
    return {"summary": summary, "rows": rows}


def rows_to_csv(rows: List[dict]) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def run_certify(cfg: dict, data: Path, model: Path, out: Path, table: Path) -> dict:
    """Certify stage: test split at ``cfg['radius']`` -> summary JSON + per-sample CSV."""
    from .checkpoints import load_model
    from .data import load_splits, to_tensors
    from .io import write_json, write_text

    radius = float(cfg["radius"])
    if not math.isfinite(radius) or radius < 0:
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    splits = load_splits(data)
    net, ckpt = load_model(model)
    x, y = to_tensors(splits.test_x, splits.test_y)
    if tuple(x.shape[1:]) != tuple(net.input_shape):
        raise ValueError(f"test images of shape {tuple(x.shape[1:])} do not fit the model input {net.input_shape}")
    result = certify_dataset(net, x, y, radius, cfg["certify"], progress=cfg["certify"].get("progress", True))
    s = result["summary"]
    s["bound_used_for_training"] = ckpt.get("train", {}).get("bound", "unknown")
    s["experiment"] = cfg["name"]
    if s["attack"]["broken"] > 0:
        failed = Path(str(out) + ".audit-failed.json")
        write_json(failed, {"summary": s, "broken": [r for r in result["rows"]
                                                    if r["attack_margin"] == r["attack_margin"]
                                                    and r["attack_margin"] <= 0]})
        raise AuditFailure(f"PGD broke {s['attack']['broken']} of {s['attack']['checked']} certified points at "
                           f"radius {radius}: a certificate is wrong. Details: {failed}")
    write_text(table, rows_to_csv(result["rows"]))
    write_json(out, s)
    print(f"[certify] {cfg['name']} r={radius:g}: clean {s['clean_acc']:.3f}  certified local "
          f"{s['certified_acc_local']:.3f}  global {s['certified_acc_global']:.3f}  audit "
          f"{s['attack']['broken']}/{s['attack']['checked']} broken  ({s['samples_per_s']:.1f} samples/s)")
    return s
