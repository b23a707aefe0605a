"""l2 attacks used to audit certificates.

A certificate at radius eps promises z_y > z_j for every j != y on the whole
ball, so any point found with max_{j != y} z_j >= z_y breaks it. The attacks are
not clipped to the [0, 1] pixel box: certificates cover the whole l2 ball.

Two searches give the same answer (the lowest margin found in the ball, per point):
``pgd_l2`` (fixed-length PGD, restarts one after the other; kept for comparison) and
``margin_attack_l2`` (the audit's default: multi-targeted margin attack, all restarts in
one batch, early stop). ``audit_l2`` runs the one the settings name.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

#: The margin attack's batch: at most this many rows (restarts x points) go through the model at once.
MAX_ROWS = 1024


def _margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """z_y - max_{j != y} z_j (<= 0 means the prediction y is broken)."""
    z = model(x)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).max(dim=1).values
    return z_y - other


def _unit(t: Tensor) -> Tensor:
    n = t.flatten(1).norm(dim=1).clamp_min(1e-30)
    return t / n.view(-1, *([1] * (t.dim() - 1)))


def _project(delta: Tensor, eps: float) -> Tensor:
    """delta scaled back into the ball, slightly inside the sphere so rounding never leaves it."""
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
    inside = eps * (1 - 8 * torch.finfo(delta.dtype).eps)
    return delta * (inside / norm).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))


def _in_work_dtype(search, model: nn.Module, x: Tensor, y: Tensor, eps: float,
                   work_dtype: Optional[torch.dtype]) -> Tensor:
    """Run ``search(model, x) -> (best margin, its perturbation)`` (in ``work_dtype`` on a copy of the
    model when asked) and return the model's own margin, in x's dtype, at the point it found."""
    was_training = model.training
    model.eval()
    try:
        if work_dtype is None or work_dtype == x.dtype:
            best, _ = search(model, x)
            return best
        work = copy.deepcopy(model).to(work_dtype).eval()
        _, delta = search(work, x.to(work_dtype))
        with torch.no_grad():
            found = _margin(model, x + _project(delta.to(x.dtype), eps), y)
            return torch.minimum(_margin(model, x, y), found)
    finally:
        model.train(was_training)


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = 50, restarts: int = 5,
           step_size: float = 0.1, generator: Optional[torch.Generator] = None,
           work_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Smallest margin z_y - max_{j!=y} z_j found in the l2 ball of radius eps, per sample.

    Each restart starts at a uniformly random point of the ball (the first at x
    itself) and takes ``steps`` normalized-gradient steps of ``step_size * eps``,
    projecting back onto the ball; the best (lowest) margin over all iterates is kept.

    ``work_dtype`` (e.g. float32 for a float64 model): the search runs on a copy of the model
    in that dtype (about twice as fast on CPUs), and the point it found is evaluated again in
    x's dtype: the returned margin is always the model's own margin at a point of the ball.
    """
    return _in_work_dtype(lambda m, xs: _search(m, xs, y, eps, steps, restarts, step_size, generator),
                          model, x, y, eps, work_dtype)


def _search(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int, step_size: float,
            generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """(lowest margin over all iterates, the perturbation that reached it), per sample."""
    with torch.no_grad():
        best = _margin(model, x, y)
    best_delta = torch.zeros_like(x)
    if eps <= 0:
        return best, best_delta

    def keep(m: Tensor, delta: Tensor) -> None:
        better = m < best
        best.copy_(torch.where(better, m, best))
        best_delta.copy_(torch.where(better.view(-1, *([1] * (x.dim() - 1))), delta, best_delta))

    for r in range(restarts):
        if r == 0:
            delta = torch.zeros_like(x)
        else:
            d = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            radius = torch.rand(x.shape[0], generator=generator, dtype=x.dtype).to(x.device)
            radius = radius ** (1.0 / x[0].numel())
            delta = _unit(d) * (eps * (1 - 8 * torch.finfo(x.dtype).eps) * radius).view(-1, *([1] * (x.dim() - 1)))
        for _ in range(steps):
            delta.requires_grad_(True)
            m = _margin(model, x + delta, y)
            grad, = torch.autograd.grad(m.sum(), delta)
            with torch.no_grad():
                keep(m.detach(), delta.detach())
                delta = _project(delta - step_size * eps * _unit(grad), eps)
        with torch.no_grad():
            keep(_margin(model, x + delta, y), delta)
    return best, best_delta


def margin_attack_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = 50, restarts: int = 5,
                     step_size: float = 0.1, patience: int = 3, generator: Optional[torch.Generator] = None,
                     work_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Smallest margin z_y - max_{j!=y} z_j found in the l2 ball of radius eps, per sample (as ``pgd_l2``).

    Restart 0 descends the margin itself from x; restart r = 1, 2, ... descends z_y - z_t for the
    r-th runner-up class t of the clean logits (a multi-targeted attack: each start pushes towards
    another class, where random starts mostly find the same runner-up again), also from x; restarts
    beyond the classes start at random points of the ball. All restarts of all points run as one
    batch (at most ``MAX_ROWS`` rows at a time), with normalized-gradient steps of ``step_size * eps``.

    Early stop: a point stops once a restart found a margin < 0 (its certificate is broken: nothing
    more to learn); a restart whose best margin has not dropped by 0.1% for ``patience`` steps halves
    its step (twice), then stops (a heuristic: a stalled search rarely recovers, measured in
    bench/README.md against the full-length PGD).
    Every restart of every point otherwise runs ``steps`` steps.
    """
    return _margin_attack(model, x, y, eps, (steps, restarts, step_size, patience), generator, work_dtype, {})


def _margin_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, plan: Tuple[int, int, float, int],
                   generator: Optional[torch.Generator], work_dtype: Optional[torch.dtype],
                   stats: Dict[str, int]) -> Tensor:
    """``margin_attack_l2`` with plan = (steps, restarts, step_size, patience); ``stats["passes"]`` counts
    the passes of single inputs through the model (forward, and backward but for the last)."""
    steps, restarts, step_size, patience = plan

    def search(m: nn.Module, xs: Tensor) -> Tuple[Tensor, Tensor]:
        per = max(1, MAX_ROWS // max(1, restarts))  # points per batch: all their restarts at once
        parts = [_margin_search(m, xs[i:i + per], y[i:i + per], eps, steps, restarts, step_size, patience,
                                generator, stats) for i in range(0, xs.shape[0], per)]
        if not parts:
            return _margin(m, xs, y), torch.zeros_like(xs)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    return _in_work_dtype(search, model, x, y, eps, work_dtype)


def _starts(x: Tensor, y: Tensor, logits: Tensor, eps: float, restarts: int,
            generator: Optional[torch.Generator]) -> Tuple[Tensor, Tensor]:
    """(first perturbation, target class or -1 for the margin itself) of every row; row r * n + i is
    restart r of point i."""
    n, c = logits.shape
    runner_up = logits.masked_fill(F.one_hot(y, c).bool(), float("-inf")).argsort(dim=1, descending=True)
    deltas, targets = [], []
    for r in range(restarts):
        if 1 <= r < c:
            targets.append(runner_up[:, r - 1])
            deltas.append(torch.zeros_like(x))
        elif r == 0:
            targets.append(torch.full_like(y, -1))
            deltas.append(torch.zeros_like(x))
        else:
            targets.append(torch.full_like(y, -1))
            d = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            radius = torch.rand(n, generator=generator, dtype=x.dtype).to(x.device) ** (1.0 / x[0].numel())
            scale = eps * (1 - 8 * torch.finfo(x.dtype).eps) * radius
            deltas.append(_unit(d) * scale.view(-1, *([1] * (x.dim() - 1))))
    return torch.cat(deltas), torch.cat(targets)


def _objective(z: Tensor, y: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    """(the margin z_y - max_{j!=y} z_j, what the row descends: the margin, or z_y - z_target)."""
    z_y = z.gather(1, y[:, None]).squeeze(1)
    margin = z_y - z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).max(dim=1).values
    z_t = z.gather(1, target.clamp_min(0)[:, None]).squeeze(1)
    return margin, torch.where(target >= 0, z_y - z_t, margin)


def _margin_search(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int,
                   step_size: float, patience: int, generator: Optional[torch.Generator],
                   stats: Dict[str, int]) -> Tuple[Tensor, Tensor]:
    """(lowest margin over all iterates of all restarts, the perturbation that reached it), per point."""
    n, view = x.shape[0], (-1, *([1] * (x.dim() - 1)))
    with torch.no_grad():
        logits = model(x)
    clean, _ = _objective(logits, y, torch.full_like(y, -1))
    if eps <= 0:
        return clean, torch.zeros_like(x)
    delta, target = _starts(x, y, logits, eps, restarts, generator)
    rows = delta.shape[0]
    point = torch.arange(n, device=x.device).repeat(rows // n)
    xr, yr = x[point], y[point]
    best = torch.full((rows,), float("inf"), dtype=x.dtype, device=x.device)
    best_delta = torch.zeros_like(delta)
    step = torch.full((rows,), step_size * eps, dtype=x.dtype, device=x.device)
    stalled = torch.zeros(rows, dtype=torch.long, device=x.device)
    halvings = torch.full((rows,), 2, dtype=torch.long, device=x.device)
    active = torch.ones(rows, dtype=torch.bool, device=x.device)
    for k in range(steps + 1):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        d = delta[idx].requires_grad_(True)
        margin, loss = _objective(model(xr[idx] + d), yr[idx], target[idx])
        last = k == steps  # the final iterate is evaluated, not stepped from
        grad = None if last else torch.autograd.grad(loss.sum(), d)[0]
        stats["passes"] = stats.get("passes", 0) + int(idx.numel())
        with torch.no_grad():
            margin = margin.detach()
            improved = margin < best[idx] - 1e-3 * best[idx].abs().nan_to_num(posinf=0.0)
            better = margin < best[idx]
            best_delta[idx[better]] = d.detach()[better]
            best[idx] = torch.minimum(best[idx], margin)
            if last:
                break
            stalled[idx] = torch.where(improved, torch.zeros_like(stalled[idx]), stalled[idx] + 1)
            halve = stalled[idx] >= patience
            step[idx] = torch.where(halve, step[idx] / 2, step[idx])
            active[idx[halve & (halvings[idx] == 0)]] = False
            halvings[idx] = halvings[idx] - halve.long()
            stalled[idx[halve]] = 0
            broken = torch.zeros(n, dtype=torch.bool, device=x.device)
            broken[point[best < 0]] = True
            active &= ~broken[point]
            delta[idx] = _project(d.detach() - step[idx].view(view) * _unit(grad), eps)
    per_point = best.view(-1, n)
    low, which = per_point.min(dim=0)
    found = best_delta.view(-1, *x.shape)[which, torch.arange(n, device=x.device)]
    keep = clean <= low  # the clean point itself is the lowest
    return torch.minimum(clean, low), torch.where(keep.view(view), torch.zeros_like(found), found)


def audit_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float, attack, generator: Optional[torch.Generator] = None,
             work_dtype: Optional[torch.dtype] = None, stats: Optional[Dict[str, int]] = None) -> Tensor:
    """The audit's attack as ``attack`` (``certify.attack``) names it: ``margin`` (``margin_attack_l2``)
    or ``pgd`` (``pgd_l2``). Lowest margin found per point."""
    method = str(attack.method)
    if method == "pgd":
        if stats is not None:
            stats["passes"] = stats.get("passes", 0) + x.shape[0] * (attack.restarts * (attack.steps + 1) + 1)
        return pgd_l2(model, x, y, eps, steps=attack.steps, restarts=attack.restarts, step_size=attack.step_size,
                      generator=generator, work_dtype=work_dtype)
    return _margin_attack(model, x, y, eps, (attack.steps, attack.restarts, attack.step_size, attack.patience),
                          generator, work_dtype, stats if stats is not None else {})



def describe_attack(a: dict) -> str:
    """A summary's ``attack`` record in words (certificates written before the margin attack name no
    method: they were attacked by PGD)."""
    common = f"{a['steps']} steps of {a['step_size']:g} r, {a['restarts']} start(s)"
    if a.get("method", "pgd") == "pgd":
        return f"l2 PGD, {common}"
    return (f"l2 margin attack, up to {common} (the margin itself, then the runner-up classes; a start stops "
            f"once it breaks the point, or after {a.get('patience')} steps without progress at its smallest step)")
