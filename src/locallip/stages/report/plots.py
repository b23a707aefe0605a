"""The report's figures: training curves, fixed neurons and bound ratio per layer, certified
accuracy against the radius and against training time. Written atomically as PNG (no
timestamps in the metadata)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from ...foundation.files import atomic_path
from .tables import curve


def _figure(size):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure(figsize=size)


def _save_png(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    return Path(path)


def _series(epochs: Sequence[dict], key: str, index: Optional[int] = None) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for e in epochs:
        v = e.get(key)
        if index is not None:
            v = v[index] if isinstance(v, list) and len(v) > index else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
            xs.append(e["epoch"])
            ys.append(v)
    return xs, ys


def plot_training(metrics: dict, path: Path, title: str = "",
                  baselines: Sequence[Tuple[str, dict]] = ()) -> Path:
    """Loss (top) and validation clean/certified accuracy with the eps schedule (bottom); baselines dashed."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure((7.5, 6.5))
    ax_loss, ax_acc = fig.subplots(2, 1, sharex=True)
    epochs = metrics["epochs"]
    if not epochs:
        ax_loss.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.plot(*_series(epochs, "loss"), marker="o", ms=3, label="training loss")
    for i, (label, bm) in enumerate(baselines):
        ax_loss.plot(*_series(bm["epochs"], "loss"), ls="--", color=f"C{3 + i}", alpha=0.7,
                     label=f"{label}: training loss")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=7)
    for key, marker, color, label in (("val_clean_acc", "o", "C0", "val clean"),
                                      ("val_certified_acc", "s", "C1", "val certified")):
        xs, ys = _series(epochs, key)
        ax_acc.plot(xs, [100 * y for y in ys], marker=marker, ms=3, color=color, label=label)
    for i, (label, bm) in enumerate(baselines):
        xs, ys = _series(bm["epochs"], "val_certified_acc")
        ax_acc.plot(xs, [100 * y for y in ys], ls="--", color=f"C{3 + i}", alpha=0.7,
                    label=f"{label}: val certified")
    best = metrics.get("best_epoch")
    if isinstance(best, int):
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
    ax_acc.legend(h1 + h2, l1 + l2, fontsize=6, loc="lower right")
    fig.suptitle(title or "training")
    fig.tight_layout()
    return _save_png(fig, Path(path))


def plot_certified_vs_time(curves: Sequence[Tuple[str, Sequence[Tuple[float, float]]]], path: Path,
                           title: str = "", budget: Optional[float] = None) -> Path:
    """Validation certified accuracy against cumulative training time, one line per system."""
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    for i, (label, pts) in enumerate(curves):
        if pts:
            ax.plot([t for t, _ in pts], [100 * v for _, v in pts], marker="o", ms=3, color=f"C{i}", label=label)
    if budget:
        ax.axvline(budget, color="k", ls=":", lw=1, label="this model's training time")
    ax.set_xlabel("cumulative training time (s)")
    ax.set_ylabel("validation certified accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "certified accuracy vs training time")
    fig.tight_layout()
    return _save_png(fig, Path(path))


def plot_bound_diagnostics(metrics: dict, path: Path, title: str = "") -> Path:
    """Per epoch and layer: fraction of fixed neurons (top), training / converged bound ratio (bottom)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure((7.5, 6.5))
    ax_fix, ax_ratio = fig.subplots(2, 1, sharex=True)
    epochs = metrics["epochs"]
    layers = max((len(e.get("fixed_per_layer") or []) for e in epochs), default=0)
    for l in range(layers):
        xs, ys = _series(epochs, "fixed_per_layer", l)
        ax_fix.plot(xs, [100 * y for y in ys], marker="o", ms=3, color=f"C{l}", label=f"layer {l + 1} (training steps)")
        xs, ys = _series(epochs, "fixed_per_layer_val", l)
        if xs:
            ax_fix.plot(xs, [100 * y for y in ys], ls="--", color=f"C{l}", alpha=0.7,
                        label=f"layer {l + 1} (validation, epoch's eps)")
        xs, ys = _series(epochs, "bound_ratio_layers_median", l)
        ax_ratio.plot(xs, ys, marker="o", ms=3, color=f"C{l}", label=f"layer {l + 1}: median")
        xs, ys = _series(epochs, "bound_ratio_layers_worst", l)
        ax_ratio.plot(xs, ys, ls=":", color=f"C{l}", alpha=0.8, label=f"layer {l + 1}: worst")
    xs, ys = _series(epochs, "bound_ratio_median")
    if xs:
        ax_ratio.plot(xs, ys, color="k", lw=2, label="whole bound: median")
    if not layers:
        ax_fix.text(0.5, 0.5, "no local-bound statistics (global-bound training)", ha="center", va="center",
                    transform=ax_fix.transAxes)
    ax_fix.set_ylabel("fixed neurons (%)")
    ax_fix.grid(alpha=0.3)
    ax_fix.legend(fontsize=6, ncol=2)
    ax_ratio.axhline(1.0, color="gray", lw=1)
    ax_ratio.set_ylabel("training / converged\nlocal bound")
    ax_ratio.set_xlabel("epoch")
    ax_ratio.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_ratio.grid(alpha=0.3)
    ax_ratio.legend(fontsize=6, ncol=2)
    fig.suptitle(title or "local bound during training")
    fig.tight_layout()
    return _save_png(fig, Path(path))


def plot_certified_vs_radius(rows: Sequence[dict], path: Path, title: str = "",
                             baselines: Sequence[Tuple[str, Sequence[dict], Optional[Sequence[dict]]]] = (),
                             paper: Sequence[Any] = (), radii: Optional[Sequence[dict]] = None, level: str = "") -> Path:
    """Certified accuracy against the radius: curves from per-point certified radii where available,
    the certified radii as markers, the paper's numbers as stars. ``baselines``: (label, rows, radii)."""
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    top = max([r["radius"] for r in rows] + [0.0]) * 2 or 1.0
    grid = [top * i / 200 for i in range(201)]
    suffix = f" ({level})" if level else ""
    if radii:
        ax.plot(grid, [100 * v for v in curve(radii, "local", grid)], color="C1",
                label=f"this model, local certificate{suffix}")
        ax.plot(grid, [100 * v for v in curve(radii, "global", grid)], color="C0",
                label="this model, global-bound certificate")
    xs = [r["radius"] for r in rows]
    ax.plot(xs, [100 * r["cert_local"] for r in rows], "o", color="C1",
            label=None if radii else f"this model, local certificate{suffix}")
    ax.plot(xs, [100 * r["cert_global"] for r in rows], "s", color="C0",
            label=None if radii else "this model, global-bound certificate")
    for i, (label, brows, bradii) in enumerate(baselines):
        color = f"C{3 + i}"
        if bradii:
            ax.plot(grid, [100 * v for v in curve(bradii, "local", grid)], color=color, ls="--",
                    label=f"{label}, local certificate{suffix}")
        bx = [r["radius"] for r in brows]
        ax.plot(bx, [100 * r["cert_local"] for r in brows], "o", mfc="none", color=color,
                label=None if bradii else f"{label}, local certificate{suffix}")
    for i, p in enumerate(paper):
        if p.certified is not None:
            ax.plot([float(p.eps)], [float(p.certified)], marker="*", ms=12, ls="none", color=f"C{7 + i % 3}",
                    label=f"paper: {p.system}, {p.setting}")
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax.set_title(title or "certified accuracy vs radius")
    fig.tight_layout()
    return _save_png(fig, Path(path))
