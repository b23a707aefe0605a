"""The report's figures: training curves, fixed neurons and bound ratio per layer, certified
accuracy against the radius. Written atomically as PNG (no timestamps in the metadata)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from ...pipeline.files import atomic_path
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


def plot_training(metrics: dict, path: Path, title: str = "", baseline_metrics: Optional[dict] = None,
                  baseline_label: str = "baseline") -> Path:
    """Loss (top) and validation clean/certified accuracy with the eps schedule (bottom)."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure((7.5, 6.5))
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
    ax_loss.legend(fontsize=8)
    for key, marker, color, label in (("val_clean_acc", "o", "C0", "val clean"),
                                      ("val_certified_acc", "s", "C1", "val certified")):
        xs, ys = _series(epochs, key)
        ax_acc.plot(xs, [100 * y for y in ys], marker=marker, ms=3, color=color, label=label)
        if baseline_metrics is not None:
            xs, ys = _series(baseline_metrics["epochs"], key)
            ax_acc.plot(xs, [100 * y for y in ys], ls="--", color=color, alpha=0.6, label=f"{baseline_label}: {label}")
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
    ax_acc.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    fig.suptitle(title or "training")
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
                             baseline_rows: Optional[Sequence[dict]] = None, baseline_label: str = "baseline",
                             paper: Sequence[Any] = (), radii: Optional[Sequence[dict]] = None,
                             baseline_radii: Optional[Sequence[dict]] = None, level: str = "") -> Path:
    """Certified accuracy against the radius: curves from per-point certified radii where
    available, the certified radii as markers, the paper's numbers as stars."""
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    top = max([r["radius"] for r in rows] + [0.0]) * 2 or 1.0
    grid = [top * i / 200 for i in range(201)]
    suffix = f" ({level})" if level else ""
    if radii:
        ax.plot(grid, [100 * v for v in curve(radii, "local", grid)], color="C1",
                label=f"this model, local-bound certificate{suffix}")
        ax.plot(grid, [100 * v for v in curve(radii, "global", grid)], color="C0",
                label="this model, global-bound certificate")
    if baseline_radii:
        ax.plot(grid, [100 * v for v in curve(baseline_radii, "local", grid)], color="C3", ls=":",
                label=f"{baseline_label}, local-bound certificate{suffix}")
        ax.plot(grid, [100 * v for v in curve(baseline_radii, "global", grid)], color="C3", ls="--",
                label=f"{baseline_label}, global-bound certificate")
    xs = [r["radius"] for r in rows]
    ax.plot(xs, [100 * r["cert_local"] for r in rows], "o", color="C1",
            label=None if radii else f"this model, local-bound certificate{suffix}")
    ax.plot(xs, [100 * r["cert_global"] for r in rows], "s", color="C0",
            label=None if radii else "this model, global-bound certificate")
    if baseline_rows is not None:
        bx = [r["radius"] for r in baseline_rows]
        ax.plot(bx, [100 * r["cert_local"] for r in baseline_rows], "o", mfc="none", color="C3",
                label=None if baseline_radii else f"{baseline_label}, local-bound certificate{suffix}")
        ax.plot(bx, [100 * r["cert_global"] for r in baseline_rows], "s", mfc="none", color="C3",
                label=None if baseline_radii else f"{baseline_label}, global-bound certificate")
    for i, p in enumerate(paper):
        if p.certified is not None:
            ax.plot([float(p.eps)], [float(p.certified)], marker="*", ms=12, ls="none", color=f"C{4 + i % 5}",
                    label=f"paper: {p.system}, {p.setting}")
    ax.set_xlabel("l2 radius")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "certified accuracy vs radius")
    fig.tight_layout()
    return _save_png(fig, Path(path))
