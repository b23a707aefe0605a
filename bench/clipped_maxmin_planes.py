"""How much the composed relaxation of clipped MaxMin leaves against the best planes of the 2-D function.

The linear relaxation relaxes the max output min(max(a, b), theta) of a clipped-MaxMin pair as the
clamp's lines on the interval of m = max(a, b), then MaxMin's lines of relu(a - b)
(``bounds.relaxations``). On random boxes where both the overlap a = b and the kink
max(a, b) = theta are inside (elsewhere the composition is already exact), it compares the gap
between upper and lower plane at the box's centre (= the mean gap over the box) with the best
planes for that measure: a linear program per box over the points where the function's pieces meet.
The min output is the mirror image (max(min(a, b), -theta) = -min(max(-a, -b), theta)).

    python -m bench.clipped_maxmin_planes            # 400 boxes
    python -m bench.clipped_maxmin_planes --quick    # 50 boxes
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog

from ._common import machine_info, parser, set_threads, write_result

THETA = 0.5


def _kink_points(la: float, ua: float, lb: float, ub: float) -> np.ndarray:
    """Corners of the box's pieces: the grid of bounds and theta, and where a = b crosses its lines."""
    xs = sorted({la, ua} | ({THETA} if la < THETA < ua else set()))
    ys = sorted({lb, ub} | ({THETA} if lb < THETA < ub else set()))
    pts = [(x, y) for x in xs for y in ys]
    pts += [(v, v) for v in xs if lb <= v <= ub] + [(v, v) for v in ys if la <= v <= ua]
    return np.array(pts)


def _composed_gap(la: float, ua: float, lb: float, ub: float, centre: np.ndarray) -> float:
    from locallip.bounds.relaxations import Relaxation
    from locallip.nn.activations import ClippedMaxMin

    act = ClippedMaxMin((2,)).double().requires_grad_(False)
    act.theta_hi.fill_(THETA)
    act.theta_lo.fill_(1e6)  # the min output's clamp never binds
    box = torch.tensor([[la, lb], [ua, ub]], dtype=torch.float64)
    relax = Relaxation(act, box[:1], box[1:])
    at = torch.tensor(centre, dtype=torch.float64)
    values = {}
    for sign in (1.0, -1.0):  # sign * P >= mu . z + const
        mu, const, _ = relax.back(torch.tensor([[sign, 0.0]], dtype=torch.float64), 0)
        values[sign] = sign * float(mu[0] @ at + const)
    return values[-1.0] - values[1.0]


def _best_gap(la: float, ua: float, lb: float, ub: float, centre: np.ndarray) -> float:
    pts = _kink_points(la, ua, lb, ub)
    f = np.minimum(pts.max(axis=1), THETA)
    rows, goal = np.c_[pts, np.ones(len(pts))], np.r_[centre, 1.0]
    free = [(None, None)] * 3
    lower = -linprog(-goal, A_ub=rows, b_ub=f, bounds=free).fun
    upper = linprog(goal, A_ub=-rows, b_ub=-f, bounds=free).fun
    return upper - lower


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    trials = 50 if args.quick else 400
    composed, best = [], []
    for _ in range(trials):
        c, w = rng.normal(size=2) * 0.4 + 0.8 * THETA, 0.2 + rng.random(2)
        (la, lb), (ua, ub) = c - w, c + w
        if not (la < ub and lb < ua and max(la, lb) < THETA < max(ua, ub)):
            continue  # one kink outside: the composition is exact there
        composed.append(_composed_gap(la, ua, lb, ub, c))
        best.append(_best_gap(la, ua, lb, ub, c))
    result = {"machine": machine_info(), "theta": THETA, "boxes": len(composed),
              "mean_gap_composed": float(np.mean(composed)), "mean_gap_best_planes": float(np.mean(best)),
              "composed_never_tighter": bool(np.all(np.array(best) <= np.array(composed) + 1e-9))}
    print(f"{len(composed)} boxes with both kinks inside (theta {THETA}): mean gap upper - lower over the box, "
          f"composed {result['mean_gap_composed']:.4f}, best planes per box {result['mean_gap_best_planes']:.4f}")
    write_result("clipped_maxmin_planes", result, args.out)
    return result


if __name__ == "__main__":
    main()
