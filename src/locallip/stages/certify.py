"""The certify stage: one radius, the test split, every certificate audited by an attack.

Writes ``certify/radius_<r>.json`` (accuracies per guarantee level, what each level rests
on, the attack audit, and everything that shaped the certificate: settings, the model's
sha256, the test split's digest, the code version) and ``radius_<r>.csv`` (per sample).
A failed audit removes the radius's previous certificate (it no longer matches what this
code and model produce) and records the failure; a later good run removes that record.
"""
from __future__ import annotations

import csv
import io as _io
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..attack import pgd_l2
from ..bounds import GUARANTEED, global_bound
from ..certify import Certificate, certify, local_guarantee
from ..data.splits import load_splits, to_tensors
from ..pipeline import layout
from ..pipeline.checkpoints import load_model
from ..pipeline.config import CertifySettings, CertifyStage, RunConfig, plain
from ..pipeline.dag import code_version
from ..pipeline.files import file_digest, stage_lock, write_json, write_text
from .distributed import Group, process_group, set_threads, shard

Tensor = torch.Tensor


class AuditFailure(RuntimeError):
    """The attack broke a certified point: the bound or its implementation is wrong."""


def _device(name: str = "auto") -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _local_settings(cfg: CertifySettings, level: str) -> dict:
    """certify() keyword arguments of the local bound at ``level``."""
    return {"guarantee": level, "delta": cfg.delta, "inflation": cfg.inflation, "steps": cfg.steps,
            "max_iter": cfg.max_iter, "tol": cfg.tol, "last_layer": str(cfg.last_layer), "method": str(cfg.method)}


def certify_dataset(model: nn.Module, x: Tensor, y: Tensor, radius: float, cfg: CertifySettings,
                    progress: bool = True, group: Optional[Group] = None) -> dict:
    """Certify a whole split with the global bound and the local bound at every configured level,
    and audit every certified point by PGD.

    ``cfg.guarantee`` is the headline level of the local bound (computed for every point);
    ``cfg.extra_guarantees`` are further levels reported beside it. An extra "exact" level is
    computed only where it can change the outcome: points the global certificate does not
    already certify and the estimate does (a sound bound is never below the estimate, so a
    point the estimate fails cannot pass). Batch b draws its random starts from a generator
    seeded by (``cfg.seed``, b), so the result does not depend on how batches are shared out:
    under torchrun (``group``) each rank certifies its batches and every rank returns the
    merged result. Returns a summary dict and the per-sample rows.
    """
    group = group or Group()
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    device = _device()
    model = model.to(device=device, dtype=dtype).eval()
    g = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
    starts = list(range(0, x.shape[0], cfg.batch_size))
    t0 = time.perf_counter()
    part = _certify_batches(model, x, y, radius, cfg, [starts[i] for i in shard(len(starts), group)], g, dtype,
                            device, progress and group.main)
    parts = group.all_gather(part)
    return _summarize(parts, radius, cfg, g, device, dtype, time.perf_counter() - t0)


def _certify_batches(model, x, y, radius, cfg: CertifySettings, starts: List[int], g, dtype, device,
                     progress: bool) -> dict:
    """Rows, timings and guarantee details of the batches beginning at ``starts``."""
    from tqdm import tqdm

    headline = str(cfg.guarantee)
    extras = [str(lv) for lv in cfg.extra_guarantees if lv != headline]
    levels = [headline] + extras
    out = {"rows": [], "timing": {lv: 0.0 for lv in levels + ["estimate"]}, "infos": {lv: [] for lv in levels},
           "computed": {lv: 0 for lv in levels}, "audited": 0, "broken": 0,
           "broken_levels": {lv: 0 for lv in levels + ["global"]}, "levels": levels}
    attack = cfg.attack
    for start in tqdm(starts, desc=f"certify r={radius:g}", disable=None if progress else True, unit="batch"):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
        xb = x[start:start + cfg.batch_size].to(device=device, dtype=dtype)
        yb = y[start:start + cfg.batch_size].to(device)
        glo = certify(model, xb, yb, radius, "global", global_result=g)
        certs: Dict[str, Certificate] = {}
        everyone = torch.arange(xb.shape[0], device=device)
        if "exact" in extras or "estimate" in levels:  # the estimate decides where exact can matter
            t1 = time.perf_counter()
            certs["estimate"] = _certify_subset(model, xb, yb, radius, everyone, glo, gen, g,
                                                _local_settings(cfg, "estimate"))
            out["timing"]["estimate"] += time.perf_counter() - t1
        for lv in levels:
            if lv == "estimate":
                out["computed"][lv] += xb.shape[0]
                continue
            idx = everyone
            if lv == "exact" and lv != headline:
                idx = (glo.correct & ~glo.robust & certs["estimate"].robust).nonzero().squeeze(1)
            t1 = time.perf_counter()
            certs[lv] = _certify_subset(model, xb, yb, radius, idx, glo, gen, g, _local_settings(cfg, lv))
            out["timing"][lv] += time.perf_counter() - t1
            out["computed"][lv] += int(idx.numel())
            if certs[lv].info:
                out["infos"][lv].append(certs[lv].info)
        loc = certs[headline]
        check = glo.robust.clone()
        for lv in levels:
            check |= certs[lv].robust
        attack_margin = torch.full((xb.shape[0],), float("nan"), dtype=dtype, device=device)
        if radius > 0 and bool(check.any()):
            idx = check.nonzero().squeeze(1)
            with torch.enable_grad():
                am = pgd_l2(model, xb[idx], loc.prediction[idx], radius, steps=attack.steps,
                            restarts=attack.restarts, step_size=attack.step_size, generator=gen)
            attack_margin[idx] = am
            out["audited"] += int(idx.numel())
            hit = torch.zeros_like(check)
            hit[idx] = am <= 0
            out["broken"] += int(hit.sum())
            for lv in levels:
                out["broken_levels"][lv] += int((hit & certs[lv].robust).sum())
            out["broken_levels"]["global"] += int((hit & glo.robust).sum())
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
            out["rows"].append(row)
    return out


def _summarize(parts: List[dict], radius: float, cfg: CertifySettings, g, device, dtype, elapsed: float) -> dict:
    """Merge the ranks' partial results (one part on a single process) into the summary and rows."""
    levels = parts[0]["levels"]
    headline = levels[0]
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["index"])
    timing = {lv: max(p["timing"][lv] for p in parts) for lv in parts[0]["timing"]}
    computed = {lv: sum(p["computed"][lv] for p in parts) for lv in levels}
    infos = {lv: [i for p in parts for i in p["infos"][lv]] for lv in levels}
    broken_levels = {lv: sum(p["broken_levels"][lv] for p in parts) for lv in parts[0]["broken_levels"]}
    audited, broken = sum(p["audited"] for p in parts), sum(p["broken"] for p in parts)
    n = len(rows)
    ratios = torch.tensor([r["bound_local"] / r["bound_global"] for r in rows
                           if r["bound_local"] is not None and r["bound_global"]], dtype=torch.float64)
    delta = float(cfg.delta)
    local_levels = {}
    for lv in levels:
        key = "certified_local" if lv == headline else f"certified_{lv}"
        local_levels[lv] = {
            "certified_acc": sum(r[key] for r in rows) / n,
            "guarantee": local_guarantee(lv, tol=cfg.tol, max_iter=cfg.max_iter, method=str(cfg.method),
                                         delta=delta, info=infos[lv][0] if infos[lv] else None),
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
        "time_s": elapsed,
        "processes": len(parts),
        "device": str(device), "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "guarantee": {"local": local_levels[headline]["guarantee"], "global": GUARANTEED},
        "levels": local_levels,
        "global_lipschitz": float(g.lipschitz),
        "attack": {"steps": cfg.attack.steps, "restarts": cfg.attack.restarts, "step_size": cfg.attack.step_size,
                   "checked": audited, "broken": broken, "broken_by_level": broken_levels},
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


def run_certify(cfg: CertifyStage, data: Path, model: Path, out: Path, table: Path,
                run: RunConfig = RunConfig()) -> dict:
    """Certify stage: test split at ``cfg.radius`` -> summary JSON + per-sample CSV.

    Under torchrun the batches are shared out over the ranks and rank 0 writes the merged result.
    """
    with process_group() as group:
        with (stage_lock(out, "certify") if group.main else nullcontext()):
            set_threads(run.threads, group)
            result = _certify(cfg, Path(data), Path(model), Path(out), Path(table), run, group)
        group.barrier()
    return result


def _certify(cfg: CertifyStage, data: Path, model: Path, out: Path, table: Path, run: RunConfig,
             group: Group) -> dict:
    radius = cfg.radius
    splits = load_splits(data)
    net, ckpt = load_model(model)
    x, y = to_tensors(splits.test_x, splits.test_y)
    if tuple(x.shape[1:]) != tuple(net.input_shape):
        raise ValueError(f"test images of shape {tuple(x.shape[1:])} do not fit the model input {net.input_shape}")
    result = certify_dataset(net, x, y, radius, cfg.certify, progress=run.progress, group=group)
    if not group.main:
        return result["summary"]
    s = result["summary"]
    s["experiment"] = cfg.name
    s["bound_used_for_training"] = ckpt.get("train", {}).get("bound", "unknown")
    s["provenance"] = {
        "settings": plain(cfg),
        "model": {"path": str(model), "sha256": file_digest(model), "epoch": ckpt.get("epoch"),
                  "experiment": ckpt.get("experiment"), "train_code_version": ckpt.get("code_version"),
                  "calibration": ckpt.get("calibration")},
        "test_split_sha256": {k: splits.meta.get("sha256", {}).get(k) for k in ("test_x", "test_y")},
        "code_version": code_version("certify"),
    }
    failed = layout.audit_failure(out)
    if s["attack"]["broken"] > 0:
        # The old certificate for this radius no longer matches what this code and model produce:
        # remove it, so that nothing downstream can use it.
        for stale in (out, table):
            Path(stale).unlink(missing_ok=True)
        write_json(failed, {"summary": s, "broken": [r for r in result["rows"]
                                                    if r["attack_margin"] is not None and r["attack_margin"] <= 0]})
        raise AuditFailure(f"PGD broke {s['attack']['broken']} of {s['attack']['checked']} certified points at "
                           f"radius {radius}: a certificate is wrong. Details: {failed}")
    write_text(table, rows_to_csv(result["rows"]))
    write_json(out, s)
    failed.unlink(missing_ok=True)
    levels = "  ".join(f"{lv} {v['certified_acc']:.3f}" for lv, v in s["levels"].items())
    print(f"[certify] {cfg.name} r={radius:g}: clean {s['clean_acc']:.3f}  certified local ({levels})  "
          f"global {s['certified_acc_global']:.3f}  audit {s['attack']['broken']}/{s['attack']['checked']} broken  "
          f"({s['samples_per_s']:.1f} samples/s)")
    return s
