"""The systems a report compares, side by side at equal epochs and at equal training time.

A *system* is one experiment's trained model and its certificates: this report's model and
each of its baselines (``report.baselines``). Which method trained it (Local-Lip, BCP,
GloRo) is read from what its training recorded, not from its name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .tables import best_sound, find_row, fmt_pct, fmt_radius, fmt_seconds, headline_rows

#: Systems trained for at most this many times this model's training time count as "equal time".
EQUAL_TIME_SLACK = 1.1


@dataclass
class System:
    name: str  # the experiment
    exp: dict  # what load_experiment read
    main: bool = False

    @property
    def metrics(self) -> dict:
        return self.exp["metrics"]

    @property
    def rows(self) -> List[dict]:
        return headline_rows(self.exp["certificates"])

    @property
    def method(self) -> str:
        """Local-Lip (masked local norms), BCP (the local step on global norms) or GloRo (global bound)."""
        m = self.metrics
        if m["bound"] != "local":
            return "GloRo"
        base = "BCP" if m.get("masked_norms") == "never" else "Local-Lip"
        return base if m["loss"] == "bcp_mix" else f"{base}, {m['loss']} loss"

    @property
    def epochs(self) -> int:
        return len(self.metrics["epochs"])

    @property
    def label(self) -> str:
        return f"{self.name} ({self.method}, {self.epochs} epochs)"

    def time_curve(self) -> List[Tuple[float, float]]:
        """(cumulative training time at the end of the epoch, validation certified accuracy), where validated."""
        t, out = 0.0, []
        for e in self.metrics["epochs"]:
            t += float(e.get("time_s") or 0.0)
            if e.get("val_certified_acc") is not None:
                out.append((t, float(e["val_certified_acc"])))
        return out

    def best_by(self, seconds: float) -> Optional[float]:
        """The best validation certified accuracy reached within ``seconds`` of training (None: none yet)."""
        vals = [v for t, v in self.time_curve() if t <= seconds]
        return max(vals) if vals else None


def _at(system: System, eps: float) -> Optional[float]:
    r = find_row(system.rows, eps)
    return None if r is None else best_sound(r)


def side_by_side(systems: Sequence[System]) -> Tuple[List[str], List[List[str]]]:
    """Per radius: every system's certified accuracy (its best sound certificate) and which wins, at equal epochs."""
    main = systems[0]
    header = ["radius"] + [f"{s.name}: {s.method} (%)" for s in systems] + ["winner", f"{main.name} - best other (points)"]
    body = []
    for r in main.rows:
        vals = [_at(s, r["radius"]) for s in systems]
        known = [(v, s.name) for v, s in zip(vals, systems) if v is not None]
        best_v = max(v for v, _ in known)
        winners = [n for v, n in known if abs(v - best_v) < 1e-12]
        others = [v for v in vals[1:] if v is not None]
        diff = f"{100 * (vals[0] - max(others)):+.1f}" if others and vals[0] is not None else "—"
        body.append([fmt_radius(r["radius"])] + [fmt_pct(v) for v in vals]
                    + ["tie: " + ", ".join(winners) if len(winners) > 1 else f"**{winners[0]}**", diff])
    return header, body


def equal_time(systems: Sequence[System], eps: float) -> Tuple[List[str], List[List[str]], List[str]]:
    """Every system's training time and certified accuracy at ``eps``; the answer at this model's training time.

    Validation: the best certified accuracy each run had reached by the time this model finished
    training (from the per-epoch metrics). Test: the systems trained for at most about as long.
    """
    main = systems[0]
    budget = float(main.metrics["train_time_s"])
    header = ["system", "epochs", "training time", "time / this model's", f"test certified at {fmt_radius(eps)} (%)",
              f"validation certified at {fmt_radius(eps)} within {fmt_seconds(budget)} (%)",
              f"validation certified at {fmt_radius(eps)}, best of the run (%)"]
    body = []
    for s in systems:
        t = float(s.metrics["train_time_s"])
        best_run = max((v for _, v in s.time_curve()), default=None)
        body.append([s.name + (" (this model)" if s.main else "") + f": {s.method}", str(s.epochs), fmt_seconds(t),
                     f"{t / budget:.2f}" if budget > 0 else "—", fmt_pct(_at(s, eps)), fmt_pct(s.best_by(budget)),
                     fmt_pct(best_run)])
    return header, body, equal_time_answer(systems, eps, budget)


def _winners(values: Sequence[Tuple[float, System]]) -> str:
    best = max(v for v, _ in values)
    top = [s for v, s in values if abs(v - best) < 1e-12]
    names = " and ".join(f"**{s.name} ({s.method})**" for s in top)
    return f"{names}{' (a tie)' if len(top) > 1 else ''}: {fmt_pct(best)} %"


def equal_time_answer(systems: Sequence[System], eps: float, budget: float) -> List[str]:
    lines = []
    val = [(s.best_by(budget), s) for s in systems if s.best_by(budget) is not None]
    if val:
        lines.append(f"On the validation split, by {fmt_seconds(budget)} of training (this model's whole run), the "
                     f"best certified accuracy at {fmt_radius(eps)} was reached by {_winners(val)}.")
    fair = [s for s in systems if float(s.metrics["train_time_s"]) <= EQUAL_TIME_SLACK * budget]
    test = [(_at(s, eps), s) for s in fair if _at(s, eps) is not None]
    if len(test) > 1:
        lines.append(f"On the test split, among the systems trained for at most {EQUAL_TIME_SLACK:g}x this model's "
                     f"time ({', '.join(x.name for x in fair)}), the most certified at {fmt_radius(eps)}: "
                     f"{_winners(test)}.")
    longer = [s for s in systems if s not in fair]
    if longer:
        lines.append("Trained for longer than that, so not equal-time comparisons: "
                     + ", ".join(f"{s.name} ({float(s.metrics['train_time_s']) / budget:.1f}x)" for s in longer) + ".")
    return lines
