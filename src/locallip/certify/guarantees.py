"""What a certificate promises, in words: one sentence per guarantee level, printed beside its numbers."""
from __future__ import annotations

from typing import Optional

from .steps import running_order

#: The running steps the sentences below already describe.
_DESCRIBED = ("box", "exact")


def local_guarantee(level: str, *, tol: float = 1e-4, max_iter: int = 2000, method: str = "lanczos",
                    delta: float = 1e-9, info: Optional[dict] = None) -> str:
    """One sentence on what a local-bound certificate at ``level`` promises when every point gets it."""
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


def cascade_guarantee(settings) -> str:
    """One sentence on what a cascade certificate promises under ``settings`` (``CascadeSettings``),
    whose ``level`` is the weakest guarantee allowed."""
    level, delta, tol, max_iter, masked = (settings.level, settings.delta, settings.tol, settings.max_iter,
                                           settings.masked)
    steps = ("the global (GloRo) margins, then the boxes of the local bound built on the guaranteed global "
             "layer norms (IBP ∩ ball through every layer, ball ∩ box last layer)")
    # Steps registered beyond the built-in ones run after them: each adds its clause.
    later = "".join(f", then {s.promise}" for s in running_order()
                    if s.name not in _DESCRIBED and s.runs_with(settings))
    if not masked:
        return (f"sound and deterministic: each point is certified by {steps}{later}; masked layer norms are "
                f"not used")
    if level == "estimate":
        return (f"estimate, not a guarantee, for the points certified by the masked step: {steps} are "
                f"deterministic; the masked layer norms of the remaining points are thick-restarted Lanczos "
                f"estimates from below (relative residual <= {tol:g}, at most {max_iter} applications)")
    masked_text = ("the masked layer norms proven exactly (explicit Gram matrix and a Cholesky proof)"
                   + (f", or where a layer is over the proof's budget, bounded by inflated Lanczos from a "
                      f"random start (P(false) <= {delta:g} per point, union bound over the layers)"
                      if level == "probabilistic" else ", or the layer's guaranteed global norm"))
    return (f"sound: each point is certified by the first step that decides it: {steps}, then {masked_text}{later}. "
            f"Points that fail even with masked norms estimated from below are not tried further with "
            f"Lipschitz bounds (no sound Lipschitz bound can certify them). Every certificate is deterministic except those marked probabilistic")
