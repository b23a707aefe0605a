"""What the linear-relaxation step costs the showcase model's certification (its stored fixture).

The showcase model (``mnist5k_r158``, calibrated, 500 test digits: ``tests/fixtures/showcase``) is
certified at 0.5 / 1.0 / 1.58 by the cascade as the certify stage runs it (batches of 64), with
``linear_relaxation`` off (the pipeline's ``auto``) and on, interleaved round by round. Prints the
certified counts, the points the step tried and the median time ratio on / off.

    python -m bench.relaxation_cost            # 5 rounds
    python -m bench.relaxation_cost --quick    # 2 rounds, radius 1.58 only
"""
from __future__ import annotations

import sys

import torch

from ._common import REPO, interleaved, machine_info, parser, ratios, set_threads, spread, write_result

sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from make_showcase_fixture import BATCH, RADII, load_showcase  # noqa: E402


def certify_showcase(model, x, y, g, radius: float, on: bool) -> dict:
    """The cascade over all points, batch by batch as the certify stage draws them."""
    from locallip.certify import certify

    certified, tried, applicable = 0, 0, True
    for start in range(0, x.shape[0], BATCH):
        gen = torch.Generator().manual_seed(start)
        c = certify(model, x[start:start + BATCH], y[start:start + BATCH], radius, "local", generator=gen,
                    global_result=g, linear_relaxation=on)
        certified += int(c.certified.sum())
        steps = c.record.steps
        tried += int(steps.get("linear_relaxation", 0))
        applicable = applicable and "linear_relaxation_not_applicable" not in steps
    return {"certified": certified, "relaxation_tried": tried, "relaxation_applies": applicable}


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, --quick 2)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    from locallip.bounds import global_bound

    model, x, y = load_showcase()
    g = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
    radii = (1.58,) if args.quick else RADII
    rounds = args.rounds or (2 if args.quick else 5)
    result = {"machine": machine_info(), "points": int(x.shape[0]), "rounds": rounds, "radii": {}}
    for r in radii:
        counts = {k: certify_showcase(model, x, y, g, r, k == "on") for k in ("off", "on")}
        times = interleaved({k: (lambda k=k: certify_showcase(model, x, y, g, r, k == "on")) for k in ("off", "on")},
                            rounds=rounds)
        row = {"counts": counts, "seconds": {k: spread(v) for k, v in times.items()},
               "ratio_on_off": ratios(times, "on", "off")}
        result["radii"][str(r)] = row
        print(f"r={r}: certified off {counts['off']['certified']} / on {counts['on']['certified']} of {x.shape[0]}; "
              f"relaxation tried on {counts['on']['relaxation_tried']} points "
              f"(applies: {counts['on']['relaxation_applies']}); time on/off median "
              f"{row['ratio_on_off']['median']:.3f} (min {row['ratio_on_off']['min']:.3f}, "
              f"max {row['ratio_on_off']['max']:.3f}); off {row['seconds']['off']['median']:.2f} s")
    write_result("relaxation_cost", result)
    return result


if __name__ == "__main__":
    main()
