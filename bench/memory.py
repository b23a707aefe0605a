"""Peak memory of a local-bound training epoch vs batch size (4C3F, MNIST-shaped input, CPU).

Each configuration runs in a fresh subprocess (``python -m bench.memory --child ...``)
that builds the model and a random dataset, records ``ru_maxrss`` (baseline), runs
one epoch of Local-Lip training steps exactly as ``run_train`` does them
(``stages.train.train_step`` with the ``mnist`` experiment's train config, bound local, ball_box,
eps = eps_train), and records ``ru_maxrss`` again. The child also *checks* that
nothing per dataset sample is kept between steps and fails if it is:

* the model's state_dict (parameters and buffers, power-iteration vectors included)
  has the same keys, shapes and bytes before and after the epoch;
* the optimizer state has the same size after the first and the last step;
* the number and total bytes of live tensors (gc) is the same after the first and the
  last step.

Batch sizes 32, 64, 128, 256 on the same dataset, plus one run with 4x the dataset at
batch 128 (the training overhead above the baseline must not grow with the dataset).

    python -m bench.memory [--quick]
"""
from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import time

from bench._common import REPO, machine_info, parser, set_threads, write_result

BATCH_SIZES = (32, 64, 128, 256)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return float("nan")


def _live_tensors():
    import torch

    count, seen, nbytes = 0, set(), 0
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor):
                count += 1
                st = o.untyped_storage()
                key = st.data_ptr()
                if key not in seen:
                    seen.add(key)
                    nbytes += st.nbytes()
        except Exception:  # noqa: BLE001 -- some objects refuse isinstance/storage access
            continue
    return count, nbytes


def _state_signature(model):
    return {k: (tuple(v.shape), str(v.dtype), v.numel() * v.element_size()) for k, v in model.state_dict().items()}


def _optimizer_bytes(opt) -> int:
    import torch

    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def child(batch_size: int, samples: int, threads: int) -> dict:
    import torch

    from dataclasses import replace

    from locallip.nn.models import build_model
    from locallip.foundation.compose import compose
    from locallip.training import train_step

    set_threads(threads)
    cfg = compose("mnist", config_dir=REPO / "config")
    tc = replace(cfg.train, batch_size=batch_size, bound="local", loss="bcp_mix", last_layer="ball_box")
    eps, kappa = float(tc.eps_train), float(tc.kappa_end)
    torch.manual_seed(0)
    model = build_model("4c3f", cfg.model.activation, (1, 28, 28), 10, cfg.model.theta_init)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x_train = torch.rand((samples, 1, 28, 28), generator=gen)
    y_train = torch.randint(0, 10, (samples,), generator=gen)
    gc.collect()
    base_maxrss, base_rss = _maxrss_mb(), _rss_mb()
    sig_before = _state_signature(model)
    perm = torch.randperm(samples, generator=gen)
    steps = -(-samples // batch_size)
    after_first = None
    trace = []  # ru_maxrss after every step
    t0 = time.perf_counter()
    for i in range(steps):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        xb, yb = x_train[idx], y_train[idx]
        train_step(model, opt, xb, yb, eps, kappa, tc)  # the stage's own step
        del xb, yb, idx
        trace.append(_maxrss_mb())
        if i == 0:
            gc.collect()
            after_first = {"tensors": _live_tensors(), "optimizer_bytes": _optimizer_bytes(opt)}
    epoch_s = time.perf_counter() - t0
    gc.collect()
    after_last = {"tensors": _live_tensors(), "optimizer_bytes": _optimizer_bytes(opt)}
    sig_after = _state_signature(model)
    peak = _maxrss_mb()
    checks = {
        "state_dict_unchanged": sig_before == sig_after,
        "state_dict_bytes": sum(v[2] for v in sig_after.values()),
        "optimizer_state_constant": after_first["optimizer_bytes"] == after_last["optimizer_bytes"],
        "optimizer_bytes": after_last["optimizer_bytes"],
        "live_tensors_constant": after_first["tensors"] == after_last["tensors"],
        "live_tensors_after_first_step": list(after_first["tensors"]),
        "live_tensors_after_last_step": list(after_last["tensors"]),
    }
    assert checks["state_dict_unchanged"], "the model's state_dict changed size during the epoch"
    assert checks["optimizer_state_constant"], "the optimizer state grew during the epoch"
    assert checks["live_tensors_constant"], (f"live tensors grew between steps: {after_first['tensors']} -> "
                                             f"{after_last['tensors']}")
    return {"batch_size": batch_size, "samples": samples, "steps": steps, "threads": torch.get_num_threads(),
            "dataset_mb": x_train.numel() * 4 / 2 ** 20, "baseline_maxrss_mb": base_maxrss,
            "baseline_rss_mb": base_rss, "peak_maxrss_mb": peak, "epoch_overhead_mb": peak - base_maxrss,
            "epoch_s": epoch_s, "maxrss_after_first_step_mb": trace[0],
            "maxrss_trace_mb": [round(t, 1) for t in trace] if len(trace) <= 64 else
            [round(t, 1) for t in trace[:: max(1, len(trace) // 64)]],
            "checks": checks}


def run_child(batch_size: int, samples: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", "--child", "--batch-size", str(batch_size),
           "--samples", str(samples), "--threads", str(threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + str(REPO / "src") + (os.pathsep + env["PYTHONPATH"]
                                                                      if env.get("PYTHONPATH") else "")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"memory child failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("@@MEM@@")][-1]
    return json.loads(line[len("@@MEM@@"):])


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse_hidden())
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=None, help="dataset size (default 2048, --quick 512)")
    args = p.parse_args(argv)
    samples = args.samples or (512 if args.quick else 2048)
    if args.child:
        print("@@MEM@@" + json.dumps(child(args.batch_size, samples, args.threads)), flush=True)
        return {}
    set_threads(args.threads)
    info = machine_info()
    runs = []
    for bs in BATCH_SIZES:
        r = run_child(bs, samples, args.threads)
        runs.append(r)
        print(f"[memory] batch {bs:4d}: peak {r['peak_maxrss_mb']:.0f} MB (baseline {r['baseline_maxrss_mb']:.0f} MB, "
              f"epoch +{r['epoch_overhead_mb']:.0f} MB; after step 1 {r['maxrss_after_first_step_mb']:.0f} MB), {r['steps']} steps in {r['epoch_s']:.1f}s; checks ok", flush=True)
    big = run_child(128, samples * 4, args.threads)
    print(f"[memory] batch 128, {samples * 4} samples: peak {big['peak_maxrss_mb']:.0f} MB "
          f"(baseline {big['baseline_maxrss_mb']:.0f} MB, epoch +{big['epoch_overhead_mb']:.0f} MB; after step 1 "
          f"{big['maxrss_after_first_step_mb']:.0f} MB)", flush=True)
    same = [r for r in runs if r["batch_size"] == 128][0]
    data = {"quick": args.quick, "machine": info, "arch": "4c3f", "input_shape": [1, 28, 28],
            "train_config": "experiment mnist (bound local, loss bcp_mix, last_layer ball_box), eps = eps_train",
            "measure": "ru_maxrss of a fresh subprocess per run (baseline after building model and data; peak "
                       "after one epoch)",
            "runs": runs, "dataset_scaling": {"samples": [samples, samples * 4],
                                              "epoch_overhead_mb": [same["epoch_overhead_mb"],
                                                                    big["epoch_overhead_mb"]],
                                              "peak_maxrss_mb": [same["peak_maxrss_mb"], big["peak_maxrss_mb"]],
                                              "run": big},
            "per_sample_state_kept": False,
            "checks": "state_dict keys/shapes/bytes equal before and after the epoch; optimizer state and live "
                      "tensors (count, bytes) equal after the first and the last step; asserted in the child"}
    write_result("memory", data, args.out)
    return data


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
