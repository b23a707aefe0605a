"""Certifying a whole split: batches, their random starts, the attack audit, and per-point rows.

``certify_split`` (one radius: every configured guarantee level, the global certificate
beside it, the attack audit of every certified point, or of those its budget covers) and
``radii_split`` (every point's largest certified radius) share one batch loop, ``batches``:
batch b starts at index ``start`` and draws its random starts from a generator seeded by (seed, start). So the result does not
depend on how batches are shared out: under torchrun each rank certifies its share of
the batches and every rank gets the merged result.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..attack import audit_l2
from ..bounds import GUARANTEED, GlobalBound, global_bound
from ..distributed import Group, choose_device, shard
from ..foundation.files import csv_text, write_json, write_text
from ..foundation.layout import audit_failure
from ..bounds.clean import clean_pass
from .cascade import CERTIFYING_STEPS, STEPS, Certificate, certify
from .radius import certified_radius, global_certified_radius
from .settings import CascadeSettings, from_config
from .steps import step_named
from .summary import split_summary

Tensor = torch.Tensor


#: What the audit attacks, tallied apart: the certified points (correct and robust at some level), and the
#: misclassified points whose wrong prediction is itself robust (their margins are certified too, so the
#: attack checks them, but they are not certified points).
AUDIT_GROUPS = ("certified", "misclassified_robust")


class AuditFailure(RuntimeError):
    """The attack broke a certified point: the bound or its implementation is wrong."""


def write_certificate(out: Path, table: Path, result: dict) -> dict:
    """Write a split's certificate (``out`` JSON, ``table`` CSV), or, when the attack broke a certified
    point, remove the old certificate of this radius (it no longer matches what this code and model
    produce), record the failure beside it and raise ``AuditFailure``."""
    s = result["summary"]
    failed = audit_failure(out)
    if s["attack"]["broken"] > 0:
        for stale in (out, table):
            Path(stale).unlink(missing_ok=True)
        write_json(failed, {"summary": s, "broken": [r for r in result["rows"]
                                                    if r["attack_margin"] is not None and r["attack_margin"] <= 0]})
        raise AuditFailure(f"The attack broke {s['attack']['broken']} of the {s['attack']['checked']} points it "
                           f"attacked (certified, or misclassified and proven robust) at radius {s['radius']}: a "
                           f"certificate is wrong. Details: {failed}")
    write_text(table, csv_text(result["rows"]))
    write_json(out, s)
    failed.unlink(missing_ok=True)
    return s


def certification_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float64"):
        raise ValueError(f"certification dtype must be float32 or float64, got {name!r}")
    return torch.float64 if name == "float64" else torch.float32


def batches(n: int, batch_size: int, seed: int, group: Optional[Group] = None) -> Iterator[Tuple[int, torch.Generator]]:
    """(start, generator) of this rank's batches: the one place the seed rule is written."""
    starts = list(range(0, n, batch_size))
    for i in shard(len(starts), group or Group()):
        yield starts[i], torch.Generator().manual_seed(seed * 1_000_003 + starts[i])


def level_settings(cfg, level: str) -> CascadeSettings:
    """The ``CascadeSettings`` of the local certificate at ``level`` (cfg: the certify configuration)."""
    return from_config(cfg, level)


def prepare(model: nn.Module, x: Tensor, cfg) -> Tuple[nn.Module, GlobalBound, torch.device, torch.dtype]:
    """The model in the certification dtype on the device, and its guaranteed global bound."""
    dtype, device = certification_dtype(str(cfg.dtype)), choose_device("auto")
    model = model.to(device=device, dtype=dtype).eval()
    return model, global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:])), device, dtype


def certify_split(model: nn.Module, x: Tensor, y: Tensor, radius: float, cfg, progress: bool = True,
                  group: Optional[Group] = None, audit: bool = True) -> dict:
    """Certify a split at ``radius`` with the global bound and the local certificate at every configured
    level, and audit every certified point by the attack (``audit=False``: attack nothing; with
    ``cfg.attack.budget``, a seeded random subset of them within that budget: ``budgeted_audit``). Returns
    ``{"summary", "rows"}``; the summary's ``timing`` holds the seconds of certification and audit.

    ``cfg.guarantee`` is the headline level; ``cfg.extra_guarantees`` are reported beside it.
    """
    from tqdm import tqdm

    group = group or Group()
    model, g, device, dtype = prepare(model, x, cfg)
    headline = str(cfg.guarantee)
    levels = [headline] + [str(lv) for lv in cfg.extra_guarantees if str(lv) != headline]
    part = {"rows": [], "timing": {lv: 0.0 for lv in levels}, "infos": {lv: [] for lv in levels},
            "audited": 0, "broken": 0, "broken_levels": {lv: 0 for lv in levels + ["global"]}, "levels": levels,
            "audit_groups": {k: {"checked": 0, "broken": 0} for k in AUDIT_GROUPS},
            "seconds": {"certification": 0.0, "audit": 0.0, "audit_probe": 0.0}, "audit_passes": {"passes": 0},
            "robust_points": 0}
    t0 = time.perf_counter()
    todo = list(batches(x.shape[0], cfg.batch_size, cfg.seed, group))
    for start, gen in tqdm(todo, desc=f"certify r={radius:g}", disable=None if (progress and group.main) else True,
                           unit="batch"):
        xb = x[start:start + cfg.batch_size].to(device=device, dtype=dtype)
        yb = y[start:start + cfg.batch_size].to(device)
        t_batch = time.perf_counter()
        glo = certify(model, xb, yb, radius, "global", global_result=g)
        certs: Dict[str, Certificate] = {}
        for lv in levels:
            t1 = time.perf_counter()
            certs[lv] = certify(model, xb, yb, radius, "local", level_settings(cfg, lv), generator=gen,
                                global_result=g)
            part["timing"][lv] += time.perf_counter() - t1
            part["infos"][lv].append(certs[lv].record)
        t2 = time.perf_counter()
        part["seconds"]["certification"] += t2 - t_batch  # before the audit: its budget grows by this batch
        attack_margin = _audit(model, xb, radius if audit else 0.0, glo, certs, cfg.attack, gen, part, t2)
        part["seconds"]["audit"] += time.perf_counter() - t2
        part["rows"] += _rows(start, yb, glo, certs, levels, attack_margin)
    parts = group.all_gather(part)
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["index"])
    summary = split_summary(parts, rows, radius, cfg, g, device, dtype, time.perf_counter() - t0)
    summary["attack"].update({k: {f: sum(p["audit_groups"][k][f] for p in parts) for f in ("checked", "broken")}
                              for k in AUDIT_GROUPS}, performed=bool(audit and radius > 0),
                             passes=sum(p["audit_passes"]["passes"] for p in parts))
    robust = sum(p["robust_points"] for p in parts)
    # unaudited: robust points no attack checked (the budget's, or all with audit=False); radius 0 has none
    # to check (a certificate at 0 is the clean margin itself)
    summary["attack"].update(budget=cfg.attack.budget, robust_points=robust,
                             unaudited=robust - summary["attack"]["checked"] if radius > 0 else 0)
    # seconds of the slowest process (the ranks run at once)
    summary["timing"] = {f"{k}_s": max(p["seconds"][k] for p in parts) for k in ("certification", "audit")}
    if cfg.attack.budget is not None:  # the one-point probe that gives the budget its first estimate
        summary["timing"]["audit_probe_s"] = max(p["seconds"]["audit_probe"] for p in parts)
    return {"summary": summary, "rows": rows}


def _audit(model, xb, radius: float, glo: Certificate, certs: Dict[str, Certificate], attack, gen, part,
           started: float) -> Tensor:
    """The attack (``certify.attack``) at ``radius`` against the points robust at any level: every one of
    them (``attack.budget`` None), or those the budget covers (``budgeted_audit``); each attacked point is
    attacked fully. Tallies what it breaks (radius 0: attacks nothing). ``started``: when this batch's
    audit began (its seconds count against the budget)."""
    check = glo.robust.clone()
    for c in certs.values():
        check |= c.robust
    attack_margin = torch.full((xb.shape[0],), float("nan"), dtype=xb.dtype, device=xb.device)
    attacked = torch.zeros_like(check)
    part["robust_points"] += int(check.sum())
    if radius <= 0 or not bool(check.any()):
        return attack_margin

    def attack_points(idx: Tensor) -> None:
        with torch.enable_grad():
            attack_margin[idx] = audit_l2(model, xb[idx], glo.prediction[idx], radius, attack, generator=gen,
                                          work_dtype=certification_dtype(str(attack.dtype)),
                                          stats=part["audit_passes"])
        attacked[idx] = True
        part["audited"] += int(idx.numel())

    idx = check.nonzero().squeeze(1)
    if attack.budget is None:
        attack_points(idx)
    else:
        budgeted_audit(idx, float(attack.budget), gen, part, started, attack_points)
    _tally(check, attacked, attack_margin, glo, certs, part)
    return attack_margin


def budgeted_audit(idx: Tensor, budget: float, gen: torch.Generator, part: dict, started: float,
                   attack_points: Callable[[Tensor], None]) -> None:
    """Attack (``attack_points``) the largest number of one batch's robust points ``idx``, in a random order
    drawn from the batch's generator, whose estimated cost keeps this process's audit seconds within
    ``budget`` x its certification seconds so far (``part["seconds"]``, this batch's certification included;
    ``started``: when this batch's audit began). A point's cost is estimated as the audit's seconds so far
    over its points so far (``part["audited"]``); before any point was audited, one point is attacked first
    to measure it (the probe: the one overrun the budget allows)."""
    order = idx[torch.randperm(idx.numel(), generator=gen).to(idx.device)]
    if part["audited"] == 0:
        attack_points(order[:1])
        part["seconds"]["audit_probe"] = time.perf_counter() - started
        order = order[1:]
    spent = part["seconds"]["audit"] + time.perf_counter() - started
    per_point = spent / part["audited"]
    affordable = math.floor((budget * part["seconds"]["certification"] - spent) / per_point)
    chosen = order[:max(0, min(affordable, order.numel()))]
    if chosen.numel():
        attack_points(chosen)


def _tally(check: Tensor, attacked: Tensor, attack_margin: Tensor, glo: Certificate, certs: Dict[str, Certificate],
           part: dict) -> None:
    """Count the attacked points and those the attack broke, per level and per audit group."""
    hit = attacked & (attack_margin <= 0)
    part["broken"] += int(hit.sum())
    for lv, c in certs.items():
        part["broken_levels"][lv] += int((hit & c.robust).sum())
    part["broken_levels"]["global"] += int((hit & glo.robust).sum())
    for name, members in zip(AUDIT_GROUPS, (check & glo.correct, check & ~glo.correct)):
        part["audit_groups"][name]["checked"] += int((attacked & members).sum())
        part["audit_groups"][name]["broken"] += int((hit & members).sum())


def _finite(t: Tensor) -> Optional[float]:
    """A float for the outputs; None (empty cell, JSON null) instead of NaN or inf."""
    v = float(t)
    return v if math.isfinite(v) else None


def _guarantee_of(c: Certificate, i: int) -> str:
    """What point i's certificate rests on: exact (deterministic), probabilistic, estimate or none."""
    if not bool(c.certified[i]):
        return "none"
    guarantee = step_named(STEPS[int(c.step[i])]).guarantee
    return "exact" if bool(c.deterministic[i]) else guarantee


def _step_of(c: Certificate, i: int) -> str:
    """The step that decided point i; ``misclassified`` for every misclassified point, also one whose
    wrong prediction a step proved robust (that proves nothing about its label)."""
    return STEPS[int(c.step[i])] if bool(c.correct[i]) else "misclassified"


def _rows(start: int, yb: Tensor, glo: Certificate, certs: Dict[str, Certificate], levels: List[str],
          attack_margin: Tensor) -> List[dict]:
    loc = certs[levels[0]]
    rows = []
    for i in range(yb.shape[0]):
        row = {"index": start + i, "label": int(yb[i]), "prediction": int(loc.prediction[i]),
               "worst_margin_local": _finite(loc.worst_margin[i]), "worst_margin_global": _finite(glo.worst_margin[i]),
               "bound_local": _finite(loc.bound[i]), "bound_global": _finite(glo.bound[i]),
               "certified_local": bool(loc.certified[i]), "certified_global": bool(glo.certified[i]),
               "step_local": _step_of(loc, i), "guarantee_local": _guarantee_of(loc, i),
               "converged": bool(loc.converged[i])}
        for lv in levels[1:]:
            c = certs[lv]
            row[f"certified_{lv}"] = bool(c.certified[i])
            row[f"worst_margin_{lv}"] = _finite(c.worst_margin[i])
            row[f"bound_{lv}"] = _finite(c.bound[i])
            row[f"step_{lv}"] = _step_of(c, i)
        row["attack_margin"] = _finite(attack_margin[i])  # empty where the point was not attacked
        rows.append(row)
    return rows


def radii_split(model: nn.Module, x: Tensor, y: Tensor, cfg, max_radius: float, rtol: float,
                progress: bool = True, group: Optional[Group] = None, batch_size: Optional[int] = None) -> List[dict]:
    """Per point: the largest radius certified by the local certificate (at ``cfg.guarantee``)
    and by the global one (closed form), in batches of ``batch_size`` (default ``cfg.batch_size``).
    The local search runs on [0, ``max_radius``] to the relative width ``rtol``; the local radius
    written is the larger of its result and the global radius (every local certificate starts with
    the global step, so it is never below it, and the global radius is not capped).
    Sharded like ``certify_split``; rows sorted by index."""
    from tqdm import tqdm

    group = group or Group()
    model, g, device, dtype = prepare(model, x, cfg)
    settings = level_settings(cfg, str(cfg.guarantee))
    rows = []
    size = batch_size or cfg.batch_size
    todo = list(batches(x.shape[0], size, cfg.seed, group))
    for start, gen in tqdm(todo, desc="radii", disable=None if (progress and group.main) else True, unit="batch"):
        xb = x[start:start + size].to(device=device, dtype=dtype)
        yb = y[start:start + size].to(device)
        with torch.no_grad():
            clean = clean_pass(model.eval(), xb)  # one clean forward pass for both radii
            pred = clean.logits.argmax(1)
            r_glob = global_certified_radius(model, xb, yb, g.lipschitz, clean=clean).cpu()
            r_loc = certified_radius(model, xb, yb, settings, max_radius=max_radius, rtol=rtol, generator=gen,
                                     global_result=g, clean=clean).cpu()
            # The cascade includes the global step: its radius is never below the global one.
            r_loc = torch.maximum(r_loc.double(), r_glob.double())
        for i in range(xb.shape[0]):
            rows.append({"index": start + i, "label": int(yb[i]), "prediction": int(pred[i]),
                         "certified_radius_local": float(r_loc[i]), "certified_radius_global": float(r_glob[i])})
    return sorted((r for part in group.all_gather(rows) for r in part), key=lambda r: r["index"])


__all__ = ["AUDIT_GROUPS", "AuditFailure", "CERTIFYING_STEPS", "GUARANTEED", "batches", "budgeted_audit",
           "certification_dtype", "certify_split", "level_settings", "prepare", "radii_split", "write_certificate"]
