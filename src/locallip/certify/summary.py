"""The summary of a split's certification: accuracy per level, the steps that decided, what it rests on."""
from __future__ import annotations

from typing import Dict, List

import torch

from ..bounds import GUARANTEED
from .guarantees import cascade_guarantee, local_guarantee
from .settings import from_config
from .steps import certifying_steps

MASKED_STEPS = ("exact", "probabilistic", "estimate")


def split_summary(parts: List[dict], rows: List[dict], radius: float, cfg, g, device, dtype, elapsed: float) -> dict:
    """Merge the ranks' partial results (one part on a single process) into the certificate's summary."""
    levels = parts[0]["levels"]
    headline = levels[0]
    timing = {lv: max(p["timing"][lv] for p in parts) for lv in levels}
    infos = {lv: [i for p in parts for i in p["infos"][lv]] for lv in levels}
    broken_levels = {lv: sum(p["broken_levels"][lv] for p in parts) for lv in parts[0]["broken_levels"]}
    audited, broken = sum(p["audited"] for p in parts), sum(p["broken"] for p in parts)
    n = len(rows)
    ratios = torch.tensor([r["bound_local"] / r["bound_global"] for r in rows
                           if r["step_local"] in MASKED_STEPS and r["bound_local"] is not None and r["bound_global"]],
                          dtype=torch.float64)
    local_levels = {lv: level_summary(lv, lv == headline, rows, infos[lv], timing[lv], broken_levels[lv], cfg)
                    for lv in levels}
    return {
        "radius": float(radius), "n": n,
        "clean_acc": sum(r["label"] == r["prediction"] for r in rows) / n,
        "guarantee_level": headline,
        "certified_acc_local": sum(r["certified_local"] for r in rows) / n,
        "certified_acc_global": sum(r["certified_global"] for r in rows) / n,
        "steps": local_levels[headline]["steps"],
        # local / global Lipschitz bound, over the points whose masked norms were computed
        "median_bound_ratio": float(ratios.median()) if ratios.numel() else None,
        "not_converged": sum(not r["converged"] for r in rows),
        "samples_per_s": n / max(timing[headline], 1e-9),
        "time_s": elapsed,
        "processes": len(parts),
        "device": str(device), "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
        "guarantee": {"local": local_levels[headline]["guarantee"], "global": GUARANTEED},
        "levels": local_levels,
        "global_lipschitz": float(g.lipschitz),
        "attack": {"method": str(cfg.attack.method), "patience": cfg.attack.patience,
                   "steps": cfg.attack.steps, "restarts": cfg.attack.restarts, "step_size": cfg.attack.step_size,
                   "checked": audited, "broken": broken, "broken_by_level": broken_levels},
    }


def level_summary(level: str, headline: bool, rows: List[dict], infos: List[dict], time_s: float, broken: int,
                  cfg) -> dict:
    """One level's accuracy, its steps, its guarantee and what the guarantee rests on."""
    n = len(rows)
    cert_key, step_key = ("certified_local", "step_local") if headline else (f"certified_{level}", f"step_{level}")
    steps = {s.name: sum(1 for r in rows if r[cert_key] and r[step_key] == s.name) for s in certifying_steps()}
    by_guarantee = {g: sum(steps[s.name] for s in certifying_steps() if s.guarantee == g)
                    for g in ("deterministic", "probabilistic", "estimate")}
    certified = sum(steps.values())
    deterministic = by_guarantee["deterministic"]
    delta = float(cfg.delta)
    if cfg.cascade:
        text = cascade_guarantee(from_config(cfg, level))
    else:
        text = local_guarantee(level, tol=cfg.tol, max_iter=cfg.max_iter, method=str(cfg.method), delta=delta,
                               info=infos[0].norms if infos else None)
    work = {k: sum(getattr(i, k) for i in infos) for k in ("box_points", "screened", "excluded", "masked_points")}
    for i in infos:  # the points that steps registered beyond the built-in ones tried
        for k, v in i.steps.items():
            if isinstance(v, int):
                work[f"{k}_points"] = work.get(f"{k}_points", 0) + v
    out = {
        "certified_acc": certified / n,
        "guarantee": text,
        "cascade": bool(cfg.cascade),
        "steps": {"certified_by_step": steps, "certified": certified, "deterministic": deterministic,
                  # the report's words for each step (from the step registry, so the report needs no code of it)
                  "words": {s.name: s.words for s in certifying_steps()},
                  "probabilistic": by_guarantee["probabilistic"], "estimate": by_guarantee["estimate"],
                  "deterministic_share": deterministic / certified if certified else None,
                  "delta_per_probabilistic_point": delta if steps["probabilistic"] else None,
                  "excluded_by_screen": sum(1 for r in rows if r[step_key] == "excluded"),
                  "points": work},
        "time_s": time_s, "samples_per_s": n / max(time_s, 1e-9), "broken": broken,
    }
    # Only probabilistic certificates can be false (with probability <= delta each).
    norms = [i.norms for i in infos if i.norms is not None]
    out.update(level_details(level, norms, delta, by_guarantee["probabilistic"] if cfg.cascade else n))
    return out


def level_details(level: str, infos: List, delta: float, n_probabilistic: int) -> Dict[str, object]:
    """What the masked step rests on, over all batches: per layer proofs, fallbacks, steps and inflation."""
    infos = [i for i in infos if i.get("layers")]
    if level == "estimate" or not infos:
        return {}
    layers = []
    for l in range(len(infos[0]["layers"])):
        per = [i["layers"][l] for i in infos if len(i["layers"]) > l]
        prob = [p for p in per if "steps" in p] + [q for p in per for q in p.get("probabilistic", [])]
        entry = {"side": per[0].get("side"), "global_fallback": sum(p.get("global_fallback", 0) for p in per)}
        if any("proven" in p for p in per):
            entry["proven"] = sum(p.get("proven", 0) for p in per)
            entry["probabilistic_fallback"] = sum(p.get("probabilistic_fallback", 0) for p in per)
        if prob:
            infl = [p["inflation_max"] for p in prob if p.get("inflation_max") is not None]
            entry.update(steps=prob[0]["steps"], n_max=prob[0]["n_max"], inflation_max=max(infl) if infl else None,
                         fp_margin_max=max(p["fp_margin_max"] for p in prob))
        layers.append(entry)
    out: Dict[str, object] = {"layers": layers}
    if level == "probabilistic":
        out.update(delta=delta, delta_layer=infos[0].get("delta_layer"),
                   expected_false_certificates_at_most=n_probabilistic * delta)
    return out
