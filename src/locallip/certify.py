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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

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
    converged: Tensor  # [B] estimate level: the iteration converged (always True otherwise)
    iterations: List[int]
    guarantee: str  # what the certificate promises, in words
    kind: str  # "local" | "global"
    level: str = "exact"  # "probabilistic" | "exact" | "estimate" (global certificates are exact)
    info: dict = field(default_factory=dict)  # delta, steps, inflation per layer, ...


def local_guarantee(level: str, *, tol: float = 1e-4, max_iter: int = 2000, method: str = "lanczos",
                    delta: float = 1e-9, info: Optional[dict] = None) -> str:
    """One sentence on what a local-bound certificate at ``level`` promises (printed beside its numbers)."""
    if level == "probabilistic":
        layers = (info or {}).get("layers") or []
        steps = "/".join(str(layer.get("steps")) for layer in layers) or "?"
        infl = [layer.get("inflation_max") for layer in layers if layer.get("inflation_max") is not None]
        worst = f", largest inflation {100 * max(infl):.2f}%" if infl else ""
        return (f"probabilistic: each certified point is robust with probability >= 1 - {delta:g} over the "
                f"random Lanczos starts (P(false) <= {delta:g} per point; union bound over the layers). "
                f"Masked layer norms by plain Lanczos ({steps} steps per layer, full reorthogonalisation) from "
                f"a start uniform on the sphere, inflated by the Kuczynski-Wozniakowski factor and a "
                f"floating-point margin{worst}")
    if level == "exact":
        return ("exact: deterministic upper bounds of every masked layer norm (explicit Gram matrix and a "
                "Cholesky proof with its rounding error), or the layer's guaranteed global norm where the "
                "layer is over the budget")
    how = ("thick-restarted Lanczos from a random start, until the relative residual of the top Ritz pair is "
           f"<= {tol:g} (checked explicitly)" if method == "lanczos" else
           f"power iteration from a random start, until the relative residual of the Rayleigh quotient is "
           f"<= {tol:g}" + (" (tol 0: exactly max_iter iterations)" if tol <= 0 else ""))
    return (f"estimate, not a guarantee: masked layer norms by {how} (at most {max_iter} operator "
            f"applications per layer); these approach each norm from below. Margins are never below the "
            f"guaranteed global ones, and points whose iteration did not converge use the global certificate")


def certify(model: nn.Module, x: Tensor, y: Tensor, eps: float, bound: str = "local", *,
            guarantee: str = "probabilistic", delta: float = 1e-9, inflation: float = 0.01,
            steps: Optional[int] = None, max_iter: int = 2000, tol: float = 1e-4, last_layer: str = "ball_box",
            generator: Optional[torch.Generator] = None, global_result: Optional[GlobalBound] = None,
            work_dtype: Optional[torch.dtype] = torch.float32, method: str = "lanczos") -> Certificate:
    """Certify each (x_b, y_b) at l2 radius ``eps`` with the local or the global bound.

    The global bound is the guaranteed upper bound (exact SVD / FFT). The local
    bound carries ``guarantee`` ("probabilistic", "exact" or "estimate", see
    ``bounds.local_bound``); its margins are combined with the global ones (both
    are lower bounds of the true margin, so their maximum is too). At the
    estimate level, points whose iteration did not converge use the global
    margins only. Works for any plain Sequential of supported layers (the input
    shape comes from ``x``); norms and margins are computed in the model's dtype
    (float64 recommended), iterations in ``work_dtype``.
    """
    if bound not in ("local", "global"):
        raise ValueError(f"bound must be 'local' or 'global', got {bound!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match a batch of {x.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            g = global_result or global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
            features = penultimate(model, x)
            logits = model(x)
            pred = logits.argmax(dim=1)
            m_global = global_margins(model, logits, features, pred, g.lipschitz, eps)
            info: dict = {}
            if bound == "global":
                margins = m_global
                k = g.lipschitz.expand(x.shape[0])
                converged = torch.ones_like(pred, dtype=torch.bool)
                iterations, text, level = [], g.guarantee, "exact"
            else:
                lb = local_bound(model, x, eps, guarantee=guarantee, delta=delta, inflation=inflation,
                                 steps=steps, method=method, max_iter=max_iter, tol=tol, init="random",
                                 generator=generator, work_dtype=work_dtype, global_norms=g.layer_norms)
                m_local = local_margins(model, lb, pred, last_layer)
                converged = lb.converged
                margins = torch.where(converged[:, None], torch.maximum(m_local, m_global), m_global)
                k, iterations, info, level = lb.lipschitz, lb.iterations, lb.info, guarantee
                text = local_guarantee(guarantee, tol=tol, max_iter=max_iter, method=method, delta=delta, info=info)
    finally:
        model.train(was_training)
    wm = worst_margin(margins, pred)
    correct = pred == y
    robust = wm > 0  # strictly: a tie is not certified
    return Certificate(prediction=pred, correct=correct, robust=robust, certified=robust & correct,
                       worst_margin=wm, bound=k, converged=converged, iterations=iterations,
                       guarantee=text, kind=bound, level=level, info=info)


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eps: float, bound: str, *, max_iter: int = 200,
             tol: float = 1e-4, batch_size: int = 256, seed: int = 0) -> Dict[str, float]:
    """Clean and certified accuracy of a split, for model selection and calibration.

    The local bound is the (cheaper) estimate level here: it ranks candidates, it
    certifies nothing.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    g = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
    correct = certified = 0
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
        c = certify(model, xb, yb, eps, bound, guarantee="estimate", max_iter=max_iter, tol=tol, generator=gen,
                    global_result=g)
        correct += int(c.correct.sum())
        certified += int(c.certified.sum())
    n = max(x.shape[0], 1)
    return {"clean_acc": correct / n, "certified_acc": certified / n}


# --------------------------------------------------------------------------- certify stage


class AuditFailure(RuntimeError):
    """The attack broke a certified point: the bound or its implementation is wrong."""


def _device(name: str = "auto") -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _local_settings(cfg: dict, level: str) -> dict:
    """certify() keyword arguments of the local bound at ``level`` from the certify config section."""
    return {"guarantee": level, "delta": float(cfg.get("delta", 1e-9)), "inflation": float(cfg.get("inflation", 0.01)),
            "steps": cfg.get("steps"), "max_iter": int(cfg["max_iter"]), "tol": float(cfg["tol"]),
            "last_layer": cfg.get("last_layer", "ball_box"), "method": cfg.get("method", "lanczos")}


def certify_dataset(model: nn.Module, x: Tensor, y: Tensor, radius: float, cfg: dict,
                    progress: bool = True) -> dict:
    """Certify a whole split with the global bound and the local bound at every configured level,
    and audit every certified point by PGD.

    ``cfg`` is the certify section: ``guarantee`` is the headline level of the local bound
    (computed for every point); ``extra_guarantees`` are further levels reported beside it.
    An extra "exact" level is computed only where it can change the outcome: points the
    global certificate does not already certify and the estimate does (a sound bound is never
    below the estimate, so a point the estimate fails cannot pass). Returns a summary dict and
    the per-sample rows.
    """
    from tqdm import tqdm

    from .attack import pgd_l2

    dtype = torch.float64 if cfg.get("dtype", "float64") == "float64" else torch.float32
    device = _device()
    model = model.to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(int(cfg.get("seed", 0)))
    g = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
    headline = cfg.get("guarantee", "probabilistic")
    extras = [lv for lv in cfg.get("extra_guarantees", []) or [] if lv != headline]
    levels = [headline] + extras
    rows, timing = [], {lv: 0.0 for lv in levels}
    infos: Dict[str, List[dict]] = {lv: [] for lv in levels}
    computed = {lv: 0 for lv in levels}
    batch = int(cfg.get("batch_size", 256))
    attack = cfg.get("attack", {})
    audited = broken = 0
    broken_levels: Dict[str, int] = {lv: 0 for lv in levels + ["global"]}
    t0 = time.perf_counter()
    bar = tqdm(range(0, x.shape[0], batch), desc=f"certify r={radius:g}", disable=None if progress else True,
               unit="batch")
    for start in bar:
        xb = x[start:start + batch].to(device=device, dtype=dtype)
        yb = y[start:start + batch].to(device)
        glo = certify(model, xb, yb, radius, "global", global_result=g)
        certs: Dict[str, Certificate] = {}
        for lv in levels:
            kw = _local_settings(cfg, lv)
            idx = torch.arange(xb.shape[0], device=device)
            if lv == "exact" and lv != headline:
                if "estimate" not in certs:
                    t1 = time.perf_counter()
                    certs["estimate"] = certify(model, xb, yb, radius, "local", generator=gen, global_result=g,
                                                **_local_settings(cfg, "estimate"))
                    timing.setdefault("estimate", 0.0)
                    timing["estimate"] += time.perf_counter() - t1
                idx = (glo.correct & ~glo.robust & certs["estimate"].robust).nonzero().squeeze(1)
            t1 = time.perf_counter()
            certs[lv] = _certify_subset(model, xb, yb, radius, idx, glo, gen, g, kw)
            timing[lv] += time.perf_counter() - t1
            computed[lv] += int(idx.numel())
            if certs[lv].info:
                infos[lv].append(certs[lv].info)
        loc = certs[headline]
        check = glo.robust.clone()
        for lv in levels:
            check |= certs[lv].robust
        attack_margin = torch.full((xb.shape[0],), float("nan"), dtype=dtype, device=device)
        if radius > 0 and bool(check.any()):
            idx = check.nonzero().squeeze(1)
            with torch.enable_grad():
                am = pgd_l2(model, xb[idx], loc.prediction[idx], radius, steps=int(attack.get("steps", 50)),
                            restarts=int(attack.get("restarts", 5)),
                            step_size=float(attack.get("step_size", 0.1)), generator=gen)
            attack_margin[idx] = am
            audited += int(idx.numel())
            hit = torch.zeros_like(check)
            hit[idx] = am <= 0
            broken += int(hit.sum())
            for lv in levels:
                broken_levels[lv] += int((hit & certs[lv].robust).sum())
            broken_levels["global"] += int((hit & glo.robust).sum())
        for i in range(xb.shape[0]):
            row = {"index": start + i, "label": int(yb[i]), "prediction": int(loc.prediction[i]),
                   "worst_margin_local": _finite(loc.worst_margin[i]), "worst_margin_global": _finite(glo.worst_margin[i]),
                   "bound_local": _finite(loc.bound[i]), "bound_global": _finite(glo.bound[i]),
                   "certified_local": bool(loc.certified[i]), "certified_global": bool(glo.certified[i]),
                   "converged": bool(loc.converged[i])}
            for lv in extras:
                c = certs[lv]
                row[f"certified_{lv}"] = bool(c.certified[i])
                row[f"worst_margin_{lv}"] = _finite(c.worst_margin[i])
                row[f"bound_{lv}"] = _finite(c.bound[i])
            row["attack_margin"] = _finite(attack_margin[i])  # empty where the point was not attacked
            rows.append(row)
        bar.set_postfix(cert=f"{sum(r['certified_local'] for r in rows) / len(rows):.3f}")
    n = len(rows)
    ratios = torch.tensor([r["bound_local"] / r["bound_global"] for r in rows
                           if r["bound_local"] is not None and r["bound_global"]], dtype=torch.float64)
    delta = float(cfg.get("delta", 1e-9))
    local_levels = {}
    for lv in levels:
        key = "certified_local" if lv == headline else f"certified_{lv}"
        local_levels[lv] = {
            "certified_acc": sum(r[key] for r in rows) / n,
            "guarantee": local_guarantee(lv, tol=float(cfg["tol"]), max_iter=int(cfg["max_iter"]),
                                         method=cfg.get("method", "lanczos"), delta=delta,
                                         info=infos[lv][0] if infos[lv] else None),
            "points_computed": computed[lv], "time_s": timing[lv],
            "samples_per_s": computed[lv] / max(timing[lv], 1e-9),
            "broken": broken_levels[lv],
            **_level_details(lv, infos[lv], delta, n),
        }
    summary = {
        "radius": float(radius), "n": n,
        "clean_acc": sum(r["label"] == r["prediction"] for r in rows) / n,
        "guarantee_level": headline,
        "certified_acc_local": sum(r["certified_local"] for r in rows) / n,
        "certified_acc_global": sum(r["certified_global"] for r in rows) / n,
        "median_bound_ratio": float(ratios.median()) if ratios.numel() else None,
        "not_converged": sum(not r["converged"] for r in rows),
        "samples_per_s": n / max(timing[headline], 1e-9),
        "time_s": time.perf_counter() - t0,
        "device": str(device), "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "guarantee": {"local": local_levels[headline]["guarantee"], "global": GUARANTEED},
        "levels": local_levels,
        "method": cfg.get("method", "lanczos"), "tol": float(cfg["tol"]), "max_iter": int(cfg["max_iter"]),
        "global_lipschitz": float(g.lipschitz),
        "attack": {"steps": int(attack.get("steps", 50)), "restarts": int(attack.get("restarts", 5)),
                   "step_size": float(attack.get("step_size", 0.1)), "checked": audited, "broken": broken,
                   "broken_by_level": broken_levels},
    }
    return {"summary": summary, "rows": rows}


def _finite(t: Tensor) -> Optional[float]:
    """A float for the outputs; None (empty cell, JSON null) instead of NaN or inf."""
    v = float(t)
    return v if math.isfinite(v) else None


def _certify_subset(model, xb, yb, radius, idx, glo: Certificate, gen, g, kw) -> Certificate:
    """``certify`` with the local bound on the points ``idx`` of the batch; elsewhere the global certificate."""
    if idx.numel() == xb.shape[0]:
        return certify(model, xb, yb, radius, "local", generator=gen, global_result=g, **kw)
    out = Certificate(prediction=glo.prediction.clone(), correct=glo.correct.clone(), robust=glo.robust.clone(),
                      certified=glo.certified.clone(), worst_margin=glo.worst_margin.clone(),
                      bound=torch.full_like(glo.worst_margin, float("nan")), converged=glo.converged.clone(),
                      iterations=[], guarantee="", kind="local", level=kw["guarantee"], info={})
    if idx.numel():
        c = certify(model, xb[idx], yb[idx], radius, "local", generator=gen, global_result=g, **kw)
        out.robust[idx], out.certified[idx] = c.robust, c.certified
        out.worst_margin[idx], out.bound[idx], out.converged[idx] = c.worst_margin, c.bound, c.converged
        out.iterations, out.guarantee, out.info = c.iterations, c.guarantee, c.info
    return out


def _level_details(level: str, infos: List[dict], delta: float, n: int) -> dict:
    """What a level's guarantee rests on, over all batches: per layer steps and inflation, fallbacks."""
    if level == "estimate" or not infos:
        return {}
    layers = []
    for l in range(len(infos[0].get("layers", []))):
        per = [i["layers"][l] for i in infos if len(i.get("layers", [])) > l]
        entry = {"side": per[0].get("side"), "global_fallback": sum(p.get("global_fallback", 0) for p in per)}
        if level == "probabilistic":
            infl = [p["inflation_max"] for p in per if p.get("inflation_max") is not None]
            entry.update(steps=per[0]["steps"], n_max=per[0]["n_max"],
                         inflation_max=max(infl) if infl else None,
                         fp_margin_max=max(p["fp_margin_max"] for p in per))
        else:
            entry.update(proven=sum(p.get("proven", 0) for p in per))
        layers.append(entry)
    out = {"layers": layers}
    if level == "probabilistic":
        out.update(delta=delta, delta_layer=infos[0].get("delta_layer"),
                   expected_false_certificates_at_most=n * delta)
    return out


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
                                                    if r["attack_margin"] is not None and r["attack_margin"] <= 0]})
        raise AuditFailure(f"PGD broke {s['attack']['broken']} of {s['attack']['checked']} certified points at "
                           f"radius {radius}: a certificate is wrong. Details: {failed}")
    write_text(table, rows_to_csv(result["rows"]))
    write_json(out, s)
    print(f"[certify] {cfg['name']} r={radius:g}: clean {s['clean_acc']:.3f}  certified local "
          f"{s['certified_acc_local']:.3f}  global {s['certified_acc_global']:.3f}  audit "
          f"{s['attack']['broken']}/{s['attack']['checked']} broken  ({s['samples_per_s']:.1f} samples/s)")
    return s
