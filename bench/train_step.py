"""Training-step cost: local-bound step vs plain cross-entropy and vs the GloRo global-bound step.

One step = forward + loss + backward + Adam step (+ the threshold clamp ``run_train`` does),
with ``locallip.training.robust_loss`` and the training configuration of the matching
experiment (``mnist`` for 4C3F on 1x28x28, ``cifar10`` for 6C2F and 8C2F on 3x32x32), batch 128 (--batch),
random data, after the eps ramp (eps = eps_train, kappa = kappa_end = 0).

Variants, interleaved round by round (see ``bench/_common.py``):
  plain     cross-entropy of the clean logits
  gloro     bound=global, loss=gloro (power_iters as configured)
  local     bound=local, loss=bcp_mix, last_layer=ball_box, masked_norms=always (the Local-Lip
              training step with the masked Lanczos on every sample and layer)
  local_ball  the same with last_layer=ball (shows what the BCP box intersection costs)
  local_adaptive  the default Local-Lip step, train.masked_norms=adaptive (masked Lanczos only for the
              samples and layers whose masks can change the norm by more than train.adaptive_tol)
  bcp       the local step with train.masked_norms=never: global norms, boxes kept (BCP)
  local_power2  the local step with the old training bound (2 warm-started power iterations
              instead of ``solver_steps`` Lanczos steps): what training against the certified bound costs
  local_ball_nosparsity  (only where the config has sparsity_weight > 0) last_layer=ball and no
              sparsity loss: the step whose backward skips the interval-bound chain

Then a breakdown of the local step: wall time per region (instrumented wrappers around
the library functions robust_loss calls) and a torch.profiler table of the top operators.

Operator work: multiply-adds of each variant's whole step (forward + backward, counted), relative to
the plain and the GloRo step: the floor of each time ratio (``operator_macs``).

    python -m bench.train_step [--quick] [--threads N] [--only SETTING] [--variants local_adaptive,bcp]
                               [--rounds N] [--per-round N] [--profile-steps N] [--breakdown VARIANT]
"""
from __future__ import annotations

import copy
from dataclasses import replace
import time
from contextlib import contextmanager
from typing import Callable, Dict, List

from bench._common import interleaved, machine_info, parser, ratios, set_threads, spread, write_result

import torch
import torch.nn.functional as F

SETTINGS = [
    # name, experiment whose train config is used, arch, input shape
    {"name": "2c2f_mnist5k_r158", "experiment": "mnist5k_r158", "arch": "2c2f", "input_shape": (1, 28, 28)},
    {"name": "2c2f_mnist5k", "experiment": "mnist5k", "arch": "2c2f", "input_shape": (1, 28, 28)},
    {"name": "4c3f_mnist", "experiment": "mnist", "arch": "4c3f", "input_shape": (1, 28, 28)},
    {"name": "6c2f_cifar", "experiment": "cifar10", "arch": "6c2f", "input_shape": (3, 32, 32)},
    {"name": "8c2f_cifar", "experiment": "cifar10", "arch": "8c2f", "input_shape": (3, 32, 32)},
]
BATCH = 128
TARGETS = {"local_over_plain": 3.0, "local_over_gloro": 1.5}


def _setting_cfg(experiment: str):
    from bench._common import REPO
    from locallip.foundation.compose import compose

    return compose(experiment, config_dir=REPO / "config")


def make_step(model, cfg_train, x_pool, y_pool, eps: float, kappa: float,
              phases: Dict[str, List[float]] | None = None) -> Callable[[], float]:
    """A closure running one training step on the next batch of the pool (cfg_train None = plain CE)."""
    from locallip.nn.activations import clamp_thresholds
    from locallip.training import robust_loss

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = {"i": 0}

    def step() -> float:
        i = state["i"] % len(x_pool)
        state["i"] += 1
        x, y = x_pool[i], y_pool[i]
        t0 = time.perf_counter()
        if cfg_train is None:
            loss = F.cross_entropy(model(x), y)
        else:
            loss, _ = robust_loss(model, x, y, eps, kappa, cfg_train)
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        clamp_thresholds(model)
        t3 = time.perf_counter()
        if phases is not None:
            phases["forward+loss"].append(t1 - t0)
            phases["backward"].append(t2 - t1)
            phases["optimizer"].append(t3 - t2)
        return float(loss.detach())

    return step


# --------------------------------------------------------------------------- breakdown of the local step


@contextmanager
def instrumented(totals: Dict[str, float]):
    """Wrap the library functions a local step calls with wall-clock accumulators (inclusive times)."""
    from locallip.bounds import norm_solvers
    from locallip.bounds.layers import base, weighted
    from locallip import training as train

    patches = []

    def wrap(owner, attr, label):
        orig = getattr(owner, attr)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, wrapper)
        patches.append((owner, attr, orig))

    wrap(train, "global_bound", "global_bound (train.solver, warm-started; the local step's start vectors)")
    wrap(train, "local_bound", "local_bound (total)")
    wrap(weighted.WeightedLayer, "forward", "  layer forward W h + b (clean + IBP centre)")
    wrap(weighted.WeightedLayer, "abs_linear", "  IBP radius |W| r")
    wrap(weighted.WeightedLayer, "row_norms", "  ball radius: masked row norms")
    wrap(base.AffineLayer, "pre_activation_box", "  pre-activation box (IBP ∩ ball, all of it)")
    wrap(norm_solvers, "_adaptive_choice", "  adaptive decision (which samples get masked norms)")
    wrap(norm_solvers, "_run_estimate", "  masked operator norms (Krylov steps + sigma with grad)")
    wrap(train, "local_margins", "last layer margins (ball/ball_box)")
    wrap(train, "bcp_mix_loss", "bcp_mix loss")
    try:
        yield totals
    finally:
        for owner, attr, orig in reversed(patches):
            setattr(owner, attr, orig)


def breakdown(model, cfg_train, x_pool, y_pool, eps: float, steps: int) -> dict:
    """Per-region wall time of the local step (median step), and the profiler's top operators."""
    phases = {"forward+loss": [], "backward": [], "optimizer": []}
    step = make_step(model, cfg_train, x_pool, y_pool, eps, 0.0, phases)
    step()  # warm-up
    phases = {k: [] for k in phases}
    step_phases = make_step(model, cfg_train, x_pool, y_pool, eps, 0.0, phases)
    totals: Dict[str, float] = {}
    with instrumented(totals):
        t0 = time.perf_counter()
        for _ in range(steps):
            step_phases()
        wall = (time.perf_counter() - t0) / steps
    regions = {k: v / steps for k, v in totals.items()}
    regions.update({k: sum(v) / len(v) for k, v in phases.items()})
    # torch.profiler: top operators by self CPU time (forward and backward ops are separate rows).
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(max(1, steps // 2)):
            step()
    n_prof = max(1, steps // 2)
    avgs = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in avgs)
    top = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    ops = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / n_prof,
            "share": e.self_cpu_time_total / max(total_self, 1e-9), "calls_per_step": e.count / n_prof}
           for e in top]
    return {"mean_step_s": wall, "regions_s_per_step": regions, "top_ops": ops,
            "note": "regions are inclusive wall times of instrumented library calls (nested: the indented "
                    "ones are inside local_bound); backward is not split by region"}


def operator_macs(model, cfg_train, x, y, eps: float, kappa: float) -> dict:
    """Multiply-adds of one step: the layer operators' forward calls, and the whole step as counted.

    Estimate (``step_macs``, the earlier instrument): every ``F.conv2d`` / ``F.conv_transpose2d`` /
    ``F.linear`` call of the forward (+ loss), batch included, split into calls autograd records
    (their backward is taken as ~2x again: input and weight gradients) and calls under no_grad (the
    power iterations); ``step_macs`` = no_grad + 3 x recorded.
    Count (``counted_macs``): torch's FlopCounterMode over forward *and* backward, every convolution,
    convolution backward and matrix product (mm, addmm, bmm) as executed, so a backward that needs
    no input gradient (a mask's row norms, the first layer) or that autograd never reaches is not
    charged; ``counted_forward_macs`` is its forward part. The floor of a step's time is its count.
    """
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from locallip.training import robust_loss

    counts = {"recorded": 0, "no_grad": 0}
    originals = {name: getattr(F, name) for name in ("conv2d", "conv_transpose2d", "linear")}

    def counted(name):
        def call(inp, weight, *a, **k):
            out = originals[name](inp, weight, *a, **k)
            if name == "conv_transpose2d":  # each input element meets out_channels x kh x kw taps
                n = inp.numel() * weight[0].numel()
            else:  # each output element sums in_features (or in_channels x kh x kw) products
                n = out.numel() * (weight.shape[1] if name == "linear" else weight[0].numel())
            key = "recorded" if torch.is_grad_enabled() and (inp.requires_grad or weight.requires_grad) else "no_grad"
            counts[key] += int(n)
            return out
        return call

    stats: dict = {}
    flops = FlopCounterMode(display=False)
    for name in originals:
        setattr(F, name, counted(name))
    try:
        with flops:
            if cfg_train is None:
                loss = F.cross_entropy(model(x), y)
            else:
                loss, stats = robust_loss(model, x, y, eps, kappa, cfg_train)
            forward_flops = flops.get_total_flops()
            loss.backward()
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)
    del loss
    counts["step_macs"] = counts["recorded"] * 3 + counts["no_grad"]
    counts["counted_macs"] = flops.get_total_flops() // 2  # FlopCounterMode counts 2 flops per multiply-add
    counts["counted_forward_macs"] = forward_flops // 2
    if "masked_per_layer" in stats:  # share of the batch the masked solver ran for, per hidden layer
        counts["masked_per_layer"] = [float(v) for v in stats["masked_per_layer"]]
    return counts


def floor_of(macs: Dict[str, dict]) -> Dict[str, dict]:
    """Every variant's operator work relative to the plain and the GloRo step (both instruments)."""
    out = {}
    for n, m in macs.items():
        out[n] = dict(m, step_over_plain=m["step_macs"] / macs["plain"]["step_macs"],
                      counted_over_plain=m["counted_macs"] / macs["plain"]["counted_macs"])
        if "gloro" in macs:
            out[n]["step_over_gloro"] = m["step_macs"] / macs["gloro"]["step_macs"]
            out[n]["counted_over_gloro"] = m["counted_macs"] / macs["gloro"]["counted_macs"]
    return out


# --------------------------------------------------------------------------- main


def variant_configs(tc) -> Dict[str, object]:
    """The step variants of one setting (None: plain cross-entropy)."""
    cfgs = {
        "plain": None,
        "gloro": replace(tc, bound="global", loss="gloro"),
        "local": replace(tc, bound="local", loss="bcp_mix", last_layer="ball_box", masked_norms="always"),
        "local_ball": replace(tc, bound="local", loss="bcp_mix", last_layer="ball", masked_norms="always"),
        # masked Lanczos only where the batch's masks can change a layer's norm (train.masked_norms=adaptive)
        "local_adaptive": replace(tc, bound="local", loss="bcp_mix", last_layer="ball_box", masked_norms="adaptive"),
        # no masked norms at all: BCP's bound (global norms, the boxes kept)
        "bcp": replace(tc, bound="local", loss="bcp_mix", last_layer="ball_box", masked_norms="never"),
    }
    if str(tc.solver) == "krylov":
        cfgs["local_power2"] = replace(tc, bound="local", loss="bcp_mix", last_layer="ball_box",
                                       masked_norms="always", solver="power", power_iters=2)
    if tc.sparsity_weight > 0:
        # The sparsity loss is built from the interval bounds of every layer, so (like ball_box) it makes
        # the backward pass run through the whole interval chain; this variant shows what that costs.
        cfgs["local_ball_nosparsity"] = replace(tc, bound="local", loss="bcp_mix", last_layer="ball",
                                                masked_norms="always", sparsity_weight=0.0)
    return cfgs


#: (name, numerator, denominator) of the ratios reported where both variants ran.
RATIOS = [("local_over_plain", "local", "plain"), ("local_over_gloro", "local", "gloro"),
          ("local_ball_over_plain", "local_ball", "plain"), ("local_ball_over_gloro", "local_ball", "gloro"),
          ("local_over_local_ball", "local", "local_ball"),
          ("local_adaptive_over_gloro", "local_adaptive", "gloro"),
          ("local_adaptive_over_plain", "local_adaptive", "plain"),
          ("local_over_local_adaptive", "local", "local_adaptive"), ("bcp_over_gloro", "bcp", "gloro"),
          ("gloro_over_plain", "gloro", "plain"), ("local_over_local_power2", "local", "local_power2"),
          ("local_power2_over_plain", "local_power2", "plain"),
          ("local_ball_nosparsity_over_plain", "local_ball_nosparsity", "plain"),
          ("local_ball_nosparsity_over_gloro", "local_ball_nosparsity", "gloro"),
          ("local_over_local_ball_nosparsity", "local", "local_ball_nosparsity")]


def run_setting(setting: dict, rounds: int, per_round: int, profile_steps: int,
                variants: List[str] | None = None, breakdown_of: str = "local", batch: int = BATCH) -> dict:
    """Interleaved step times, operator work and (``profile_steps`` > 0) the breakdown of one variant.
    ``variants``: the variants to run (plain and gloro always run); None: all of them."""
    from locallip.nn.models import build_model

    cfg = _setting_cfg(setting["experiment"])
    tc = replace(cfg.train, batch_size=batch)
    eps, kappa = float(tc.eps_train), float(tc.kappa_end)
    torch.manual_seed(0)
    ds = cfg.dataset
    base = build_model(setting["arch"], cfg.model.activation, setting["input_shape"], 10,
                       cfg.model.theta_init, ds.mean, ds.std)
    gen = torch.Generator().manual_seed(1)
    x_pool = [torch.rand((batch, *setting["input_shape"]), generator=gen) for _ in range(4)]
    y_pool = [torch.randint(0, 10, (batch,), generator=gen) for _ in range(4)]
    cfgs = {n: c for n, c in variant_configs(tc).items() if not variants or n in ("plain", "gloro", *variants)}
    phases = {n: {"forward+loss": [], "backward": [], "optimizer": []} for n in cfgs}
    steps = {n: make_step(copy.deepcopy(base), c, x_pool, y_pool, eps, kappa, phases[n]) for n, c in cfgs.items()}
    print(f"[train_step] {setting['name']}: {rounds} rounds x {per_round} steps per variant "
          f"(eps {eps:.4g}, batch {batch}, threads {torch.get_num_threads()})", flush=True)
    times = interleaved(steps, rounds=rounds, per_round=per_round, warmup=2)
    out = {
        "setting": setting["name"], "arch": setting["arch"], "input_shape": list(setting["input_shape"]),
        "batch_size": batch, "eps": eps, "kappa": kappa, "activation": str(cfg.model.activation),
        "train_config_from": f"experiment {setting['experiment']} (batch_size={batch}); "
                             f"variants override bound/loss/last_layer",
        "solver": str(tc.solver), "solver_steps": tc.solver_steps, "power_iters": tc.power_iters,
        "sparsity_weight": tc.sparsity_weight, "variants": list(cfgs),
        "step_s": {n: spread(t) for n, t in times.items()},
        "phase_s": {n: {k: spread(v[2:]) for k, v in ph.items()} for n, ph in phases.items()},  # after warm-up
        "ratios": {k: ratios(times, a, b) for k, a, b in RATIOS if a in times and b in times},
    }
    out["targets"] = {k: {"target_max": v, "median": out["ratios"][k]["median"],
                          "met": out["ratios"][k]["median"] <= v} for k, v in TARGETS.items() if k in out["ratios"]}
    for k, r in out["ratios"].items():
        print(f"  {k:24s} median {r['median']:.2f}x  (q1 {r['q1']:.2f}, q3 {r['q3']:.2f}, n {r['n']})")
    macs = {n: operator_macs(copy.deepcopy(base), c, x_pool[0], y_pool[0], eps, kappa) for n, c in cfgs.items()}
    out["operator_macs"] = floor_of(macs)
    for n, m in out["operator_macs"].items():
        print(f"  operator work {n:22s} counted {m['counted_over_gloro']:.2f}x GloRo, {m['counted_over_plain']:.2f}x "
              f"plain ({m['counted_macs'] / 1e9:.1f} G multiply-adds, forward + backward); estimate "
              f"{m['step_over_gloro']:.2f}x GloRo" + (f"; masked share per layer {m['masked_per_layer']}"
                                                     if "masked_per_layer" in m else ""))
    if profile_steps and breakdown_of in cfgs:
        out["local_breakdown"] = breakdown(copy.deepcopy(base), cfgs[breakdown_of], x_pool, y_pool, eps,
                                           profile_steps)
        out["local_breakdown"]["variant"] = breakdown_of
        for k, v in out["local_breakdown"]["regions_s_per_step"].items():
            print(f"    {k:60s} {v * 1000:8.1f} ms")
    return out


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--per-round", type=int, default=None, help="steps per variant and round (default 2; --quick 1)")
    p.add_argument("--only", action="append", default=[], help="run only these settings (by name; repeatable)")
    p.add_argument("--variants", default="", help="comma-separated variants to run besides plain and gloro "
                                                  "(default: all); e.g. local_adaptive,bcp")
    p.add_argument("--profile-steps", type=int, default=None, help="steps of the breakdown (0: none; default 6)")
    p.add_argument("--breakdown", default="local", help="the variant whose breakdown is profiled (default local)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    args = p.parse_args(argv)
    set_threads(args.threads)
    names = [s["name"] for s in SETTINGS]
    unknown = [n for n in args.only if n not in names]
    if unknown:
        p.error(f"--only: unknown setting(s) {', '.join(unknown)}; known: {', '.join(names)}")
    rounds = args.rounds or (3 if args.quick else 15)
    per_round = args.per_round or (1 if args.quick else 2)
    profile_steps = args.profile_steps if args.profile_steps is not None else (2 if args.quick else 6)
    variants = [v for v in args.variants.split(",") if v] or None
    known = ("local", "local_ball", "local_adaptive", "bcp", "local_power2", "local_ball_nosparsity")
    if variants and [v for v in variants if v not in known]:
        p.error(f"--variants: unknown variant(s) {', '.join(v for v in variants if v not in known)}; "
                f"known: {', '.join(known)}")
    info = machine_info()
    t0 = time.perf_counter()
    chosen = [s for s in SETTINGS if not args.only or s["name"] in args.only]
    results = [run_setting(s, rounds, per_round, profile_steps, variants, args.breakdown, args.batch)
               for s in chosen]
    data = {"quick": args.quick, "machine": info, "targets": TARGETS, "settings": results,
            "method": "variants interleaved in a shuffled order each round; per-round mean step time; "
                      "ratios are per round (same load), reported as median and quartiles over rounds",
            "wall_s": time.perf_counter() - t0}
    write_result("train_step", data, args.out)
    return data


if __name__ == "__main__":
    main()
