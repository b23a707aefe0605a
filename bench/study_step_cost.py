"""Training-step cost of a study table's rows, relative to one of them, interleaved in one process.

A study row's "train s" is wall time on a shared machine, so rows run under different loads are
not comparable to better than tens of percent. This bench times the training step of each row's
settings (its composed experiment and overrides: architecture, activation, bound, loss), on the
same random batch at the training radius, interleaved round by round, and reports each row's step
time over the reference row's, and so the epochs each row could run in the reference's training
time (reference epochs / ratio). Validation during training is not counted (the rows validate
every `train.val_every` epochs; its cost is the certification of the validation split).

    python -m bench.study_step_cost --study mnist5k_r158_gloro_line --reference r158_gloro_e200
"""
from __future__ import annotations

from dataclasses import replace

import torch

from bench._common import REPO, interleaved, machine_info, parser, ratios, set_threads, spread, write_result


def row_step(run, batch: int, shape):
    """A closure running one training step of ``run`` (a study plan's run) on a fixed random batch."""
    from locallip.stages.train import build_for_data
    from locallip.training import train_step

    tc = replace(run.train.train, batch_size=batch)
    torch.manual_seed(0)
    model = build_for_data(run.train, {"input_shape": list(shape), "num_classes": 10})
    opt = torch.optim.Adam(model.parameters(), lr=float(tc.lr))
    x = torch.rand((batch, *shape), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
    eps, kappa = float(tc.eps_train), float(tc.kappa_end)
    return lambda: train_step(model, opt, x, y, eps, kappa, tc)


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--study", required=True, help="a declaration under config/study")
    p.add_argument("--reference", required=True, help="the row the others are compared with")
    p.add_argument("--rows", nargs="*", default=None, help="rows to time (default: every row)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--batch", type=int, default=None, help="default: each row's own train.batch_size")
    p.add_argument("--shape", type=int, nargs=3, default=(1, 28, 28), help="input shape C H W (default 1 28 28)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    from locallip.pipeline import study as study_jobs

    plan = study_jobs.plan(args.study, REPO / "config")
    runs = {k: r for k, r in plan.runs.items() if args.rows is None or k in args.rows or k == args.reference}
    if args.reference not in runs:
        raise SystemExit(f"--reference {args.reference!r} is not a row of {args.study} ({', '.join(runs)})")
    batch = {k: args.batch or int(r.train.train.batch_size) for k, r in runs.items()}
    rounds, per_round = (2, 1) if args.quick else (args.rounds, args.per_round)
    times = interleaved({k: row_step(r, batch[k], args.shape) for k, r in runs.items()}, rounds=rounds, per_round=per_round)
    ref_epochs = int(runs[args.reference].train.train.epochs)
    out = {"study": args.study, "reference": args.reference, "machine": machine_info(), "rounds": rounds,
           "rows": {}}
    for k, r in runs.items():
        q = ratios(times, k, args.reference)
        out["rows"][k] = {"step_s": spread(times[k]), "over_reference": q, "batch": batch[k],
                          "epochs": int(r.train.train.epochs),
                          "epochs_in_reference_time": ref_epochs / q["median"]}
        print(f"  {k}: step {spread(times[k])['median']:.3f}s, {q['median']:.2f}x {args.reference} "
              f"(quartiles {q['q1']:.2f}-{q['q3']:.2f}); {ref_epochs / q['median']:.0f} epochs in its "
              f"{ref_epochs} epochs' time (row: {r.train.train.epochs})", flush=True)
    write_result(f"study_step_cost_{args.study}", out, args.out)
    return out


if __name__ == "__main__":
    main()
