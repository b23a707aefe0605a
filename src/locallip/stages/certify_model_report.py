"""What ``locallip certify-model`` says about its run: the audit it ran, what the certificates rest
on, the per-point radii's search range, the seconds of each step, and ``report.md``.

Apart from ``certify_model`` (which loads, checks and certifies) so that each stays small.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

from ..attack import describe_attack
from ..foundation.schema import CertifySettings, ExternalModel
from .report.tables import markdown_table, steps_table

#: ``--audit quick``: at most 10 normalized-gradient steps of 0.25 r from the point itself, one start (the
#: full audit's defaults: up to 50 steps of 0.1 r and 5 starts). Every point the full audit attacks is
#: attacked; only the search is shorter.
QUICK_ATTACK = {"steps": 10, "restarts": 1, "step_size": 0.25}

AUDIT_WORDS = {"full": "full (the configured attack)", "quick": "quick (a short search, `--audit quick`)"}

NOT_ATTACKED = ("**The certificates were not attacked** (`--audit off`): no attack checked them, so a wrong "
                "bound or a bug would go unnoticed here.")


def audit_settings(settings: CertifySettings, mode) -> Tuple[CertifySettings, bool]:
    """The certify settings whose ``attack`` the audit runs, and whether it runs at all."""
    mode = str(mode)
    if mode == "quick":
        settings = replace(settings, attack=replace(settings.attack, **QUICK_ATTACK))
    return settings, mode != "off"


def rests_on(steps: dict) -> str:
    """What a radius's certificates rest on: the weakest step that certified a point (``exact``
    when every certificate is deterministic, ``none`` when no point is certified)."""
    by = steps["certified_by_step"]
    for level in ("estimate", "probabilistic"):
        if by.get(level):
            return level
    return "exact" if steps["certified"] else "none"


def _relaxed(steps: dict) -> str:
    """The linear-relaxation step's share of the deterministic count, where it ran."""
    if "linear_relaxation_points" not in steps.get("points", {}):
        return ""
    return f" / {steps['certified_by_step']['linear_relaxation']} linear relaxation"


def headline(s: dict) -> str:
    """One line: how many points are certified, and on what."""
    st, by = s["steps"], s["steps"]["certified_by_step"]
    text = (f"r={s['radius']:g}: {st['certified']} of {s['n']} certified: {st['deterministic']} deterministic "
            f"({by['global']} global / {by['box']} box / {by['exact']} exact{_relaxed(st)}), "
            f"{st['probabilistic']} probabilistic")
    return text + (f", {st['estimate']} estimates (not guarantees)" if st["estimate"] else "")


def settle(s: dict, mode) -> dict:
    """The certificate summary as certify-model writes it: ``guarantee_level`` is what its certificates
    rest on (the level asked for is ``guarantee_configured``), the audit's mode, the headline."""
    s["guarantee_configured"] = s["guarantee_level"]
    s["guarantee_level"] = rests_on(s["steps"])
    s["attack"]["mode"] = str(mode)
    s["headline"] = headline(s)
    return s


def audit_cell(s: dict) -> str:
    a = s["attack"]
    if not a.get("performed"):
        return "not attacked"
    c, m = a["certified"], a["misclassified_robust"]
    return f"{c['broken']}/{c['checked']} broken (+ {m['broken']}/{m['checked']} misclassified-robust)"


RADII_MEANING = ("certified_radius_local: a radius at which the point was certified, found by a root search on "
                 "[0, max_radius] that stops when its bracket (certified below, not above) is narrower than tol "
                 "times its upper end, so it may lie up to about tol below the largest certified radius; a value "
                 "equal to max_radius means at least max_radius. It is never below certified_radius_global, the "
                 "global bound's closed-form radius (the cascade's first step), which is not capped. "
                 "0 for misclassified points.")


def radii_record(rows: Sequence[dict], max_radius: float, tol: float, level: str, seconds: float) -> dict:
    """What ``certify/radii.json`` says beside ``radii.csv``: the search's range and tolerance, and counts."""
    loc = [r["certified_radius_local"] for r in rows]
    glo = [r["certified_radius_global"] for r in rows]
    return {"max_radius": float(max_radius), "tol": float(tol), "guarantee": level, "points": len(rows),
            "at_max_radius": sum(a == max_radius for a in loc),
            "global_above_max_radius": sum(b > max_radius for b in glo),
            "local_is_global": sum(a == b and b > 0 for a, b in zip(loc, glo)),
            "time_s": seconds, "meaning": RADII_MEANING}


def overview(cfg: ExternalModel, summaries: Sequence[dict], radii: Optional[dict], total_s: float) -> dict:
    """``summary.json``: per radius the counts, what they rest on and the audit; the radii; the seconds."""
    per = [{"radius": s["radius"], "n": s["n"], "headline": s["headline"], "guarantee_level": s["guarantee_level"],
            "certified": s["steps"]["certified"], "deterministic": s["steps"]["deterministic"],
            "probabilistic": s["steps"]["probabilistic"], "estimate": s["steps"]["estimate"],
            "certified_by_step": s["steps"]["certified_by_step"],
            "audit": {k: s["attack"][k] for k in ("mode", "performed", "steps", "restarts", "step_size",
                                                  "certified", "misclassified_robust")},
            "timing": s["timing"]} for s in summaries]
    timing = {"certification_s": sum(s["timing"]["certification_s"] for s in summaries),
              "audit_s": sum(s["timing"]["audit_s"] for s in summaries),
              "radii_s": radii["time_s"] if radii else None, "total_s": total_s}
    return {"name": cfg.name, "audit": str(cfg.audit), "radii": per, "per_point_radii": radii, "timing": timing}


def _folded_note(description: dict) -> str:
    """What the certificates are about when BatchNorm was folded (certify_model folds every one)."""
    folded = [str(i) for i, spec in enumerate(description["layers"])
              if isinstance(spec, dict) and str(spec.get("type", "")).startswith("batchnorm")]
    if not folded:
        return ""
    return (f" BatchNorm (layer {', '.join(folded)}) is folded into the layer before it, exactly up to one rounding "
            f"of the folded weights: the certificates are about the folded network.")


def render_report(cfg: ExternalModel, summaries: Sequence[dict], what: str, description: dict,
                  radii: Optional[dict], total_s: float) -> str:
    """``report.md``: the headline counts first (and that nothing was attacked, when so), then the tables."""
    lines = [f"# {cfg.name}: certified l2 robustness of an external model", ""]
    if str(cfg.audit) == "off":
        lines += [NOT_ATTACKED, ""]
    lines += [f"- {s['headline']}" for s in summaries] + [""]
    rests = sorted({s["guarantee_level"] for s in summaries} - {"none"})
    lines += [f"Model `{cfg.model}` ({len(description['layers'])} layers, input {description['input_shape']}), "
              f"points: {what}, {summaries[0]['n']} of them. The certificates rest on: "
              f"{', '.join(rests) or 'nothing (no point certified)'} (level allowed: "
              f"{summaries[0]['guarantee_configured']}).{_folded_note(description)}", "",
              "| radius | clean (%) | certified (%) | global bound (%) | deterministic share (%) | attack audit |",
              "|---|---|---|---|---|---|"]
    for s in summaries:
        share = s["steps"]["deterministic_share"]
        lines.append(f"| {s['radius']:g} | {100 * s['clean_acc']:.1f} | {100 * s['certified_acc_local']:.1f} | "
                     f"{100 * s['certified_acc_global']:.1f} | {'—' if share is None else f'{100 * share:.1f}'} | "
                     f"{audit_cell(s)} |")
    lines += [""] + _steps_lines(summaries) + _audit_lines(cfg, summaries) + _radii_lines(radii)
    lines += _time_lines(summaries, radii, total_s)
    lines += ["## What the certificates rest on", "", summaries[0]["guarantee"]["local"] + ".", ""]
    return "\n".join(lines)


def _steps_lines(summaries: Sequence[dict]) -> List[str]:
    header, body = steps_table(summaries)
    return ["## How each point was certified", "",
            "Each point stops at the first step that decides it (`certify/steps.csv`, and `step_local` per point "
            "in `certify/radius_<r>.csv`; misclassified points are never certified: `misclassified`).", "",
            markdown_table(header, body), ""]


def _audit_lines(cfg: ExternalModel, summaries: Sequence[dict]) -> List[str]:
    if str(cfg.audit) == "off":
        return ["## Attack audit", "", "Off: no point was attacked.", ""]
    a = summaries[0]["attack"]
    return ["## Attack audit", "",
            f"Audit {AUDIT_WORDS[str(cfg.audit)]}: {describe_attack(a)}, at each radius against every certified "
            f"point, and, counted apart, every misclassified point whose wrong prediction is itself proven robust "
            f"at that radius (a break there would show a wrong bound too, but these are not certified points). A "
            f"break stops the run. The audit is an empirical check, not part of the guarantee.", ""]


def _radii_lines(radii: Optional[dict]) -> List[str]:
    if radii is None:
        return ["## Per-point radii", "", "Not computed (`--no-radii`): no `certify/radii.csv`.", ""]
    return ["## Per-point radii", "",
            f"`certify/radii.csv` (settings in `certify/radii.json`): per point, the largest radius certified by "
            f"the cascade (level allowed: {radii['guarantee']}), searched on [0, {radii['max_radius']:g}] "
            f"(`--max-radius`) to a relative tolerance of {radii['tol']:g}: each value is a radius at which the point was certified, "
            f"up to about {100 * radii['tol']:g} % below the largest one, so counts from it can differ slightly "
            f"from `radius_<r>.csv`. The local radius is never below the global bound's (which is not capped); "
            f"{radii['at_max_radius']} points reached the cap, {radii['global_above_max_radius']} have a global "
            f"radius above it.", ""]


def _time_lines(summaries: Sequence[dict], radii: Optional[dict], total_s: float) -> List[str]:
    rows = []
    for s in summaries:
        rows.append([f"certification, r={s['radius']:g}", f"{s['timing']['certification_s']:.2f}"])
        rows.append([f"attack audit, r={s['radius']:g}",
                     f"{s['timing']['audit_s']:.2f}" if s["attack"].get("performed") else "off"])
    rows.append(["per-point radii", f"{radii['time_s']:.2f}" if radii else "off"])
    rows.append(["all of certify-model (loading and writing too; not Python's start-up)", f"{total_s:.2f}"])
    return ["## Time", "", markdown_table(["step", "seconds"], rows), ""]
