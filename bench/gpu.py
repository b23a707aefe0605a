"""GPU readiness: step ratios, certification throughput and CIFAR-10 6C2F epochs on one device.

On a GPU machine it measures, on CUDA:

* the training step of 4C3F (MNIST shape) and 6C2F (CIFAR-10 shape), batch 128: plain
  cross-entropy, GloRo and the local bound (the stage's own ``train_step``), interleaved;
  ratios local/plain and local/GloRo;
* certification samples/s of the probabilistic and estimate levels and of the reference
  setting (2000 power iterations) on a 6C2F model, same points, same run;
* a few epochs of ``locallip train`` on CIFAR-10-shaped synthetic data (6C2F, the cifar10
  experiment's settings), through the real stage: data on the device, augmentation on it.

``--quick`` runs the same code on small sizes (it runs on the CPU, so it cannot rot).
Writes ``bench/results/gpu.json`` (``--quick``: ``bench/out/quick/gpu.json``).

    python -m bench.gpu [--quick] [--epochs 3]
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench._common import (REPO, WORK_DIR, interleaved, machine_info, parser, ratios, set_threads, spread,
                           write_result)

import torch


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_ratios(experiment: str, arch: str, shape, batch: int, rounds: int, per_round: int, device) -> dict:
    from locallip.nn.models import build_model
    from locallip.foundation.compose import compose
    from locallip.training import train_step

    cfg = compose(experiment, config_dir=REPO / "config")
    tc = replace(cfg.train, batch_size=batch)
    eps, kappa = float(tc.eps_train), float(tc.kappa_end)
    torch.manual_seed(0)
    base = build_model(arch, cfg.model.activation, shape, 10, cfg.model.theta_init, cfg.dataset.mean,
                       cfg.dataset.std).to(device)
    x = torch.rand((batch, *shape), device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    variants = {"plain": None, "gloro": replace(tc, bound="global", loss="gloro"),
                "local": replace(tc, bound="local", loss="bcp_mix")}

    def make(v):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def run():
            if v is None:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            else:
                train_step(model, opt, x, y, eps, kappa, v)
            _sync(device)
        return run

    times = interleaved({k: make(v) for k, v in variants.items()}, rounds=rounds, per_round=per_round, warmup=2)
    return {"experiment": experiment, "arch": arch, "shape": list(shape), "batch": batch,
            "step_s": {k: spread(t) for k, t in times.items()},
            "local_over_plain": ratios(times, "local", "plain"), "local_over_gloro": ratios(times, "local", "gloro")}


def certification(n: int, rounds: int, device, reference_iters: int = 2000) -> dict:
    from locallip.bounds import global_bound
    from locallip.certify import certify
    from locallip.nn.models import build_model

    torch.manual_seed(0)
    model = build_model("6c2f", "clipped_relu", (3, 32, 32), 10).to(device=device, dtype=torch.float64).eval()
    x = torch.rand((n, 3, 32, 32), device=device, dtype=torch.float64)
    y = model(x).argmax(1)
    eps = 36 / 255
    g = global_bound(model)
    settings = {"probabilistic": {"guarantee": "probabilistic"}, "estimate": {"guarantee": "estimate"},
                "reference": {"guarantee": "estimate", "method": "power", "tol": 0.0, "max_iter": reference_iters}}
    certified = {}

    def make(name, kw):
        def run():
            c = certify(model, x, y, eps, generator=torch.Generator().manual_seed(0), global_result=g, **kw)
            _sync(device)
            certified[name] = float(c.certified.double().mean())
        return run

    times = interleaved({k: make(k, kw) for k, kw in settings.items()}, rounds=rounds, per_round=1, warmup=0)
    return {"n": n, "eps": eps, "reference_iters": reference_iters,
            "samples_per_s": {k: spread([n / t for t in v]) for k, v in times.items()},
            "speedup_over_reference": {k: ratios(times, "reference", k) for k in ("probabilistic", "estimate")},
            "certified_acc": certified,
            "note": "an untrained 6C2F at eps 36/255 (throughput only; its certified accuracy is not meaningful)"}


def cifar_epochs(epochs: int, n_train: int, quick: bool) -> dict:
    """``locallip train`` (the real stage) on CIFAR-10-shaped synthetic data."""
    import numpy as np

    from locallip.data.splits import Splits, save_splits
    from locallip.foundation.compose import compose
    from locallip.foundation.schema import RunConfig
    from locallip.pipeline.table import stage_config
    from locallip.stages.train import run_train

    overrides = [f"train.epochs={epochs}", f"train.ramp_epochs={max(1, epochs - 1)}", "train.warmup_epochs=0",
                 "train.diagnostics_size=64", "train.val_max_iter=20"]
    cfg = compose("cifar10", overrides, config_dir=REPO / "config")
    rng = np.random.default_rng(0)

    def images(k):
        return rng.integers(0, 256, (k, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, k).astype(np.int64)

    tx, ty = images(n_train)
    vx, vy = images(256 if not quick else 32)
    cx, cy = images(32)
    sx, sy = images(32)
    splits = Splits(tx, ty, vx, vy, cx, cy, sx, sy, meta={"name": "cifar10", "input_shape": [3, 32, 32],
                                                          "num_classes": 10, "source": "synthetic"})
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=WORK_DIR if WORK_DIR.exists() else None))
    save_splits(splits, work / "splits.npz")
    t0 = time.perf_counter()
    summary = run_train(stage_config(cfg, "train"), work / "splits.npz", work / "model.pt", work / "metrics.json",
                        work / "state" / "last.pt", run=RunConfig(progress=False))
    wall = time.perf_counter() - t0
    per_epoch = [e["time_s"] for e in summary["epochs"]]
    shutil.rmtree(work, ignore_errors=True)
    return {"epochs": epochs, "train_images": n_train, "batch": cfg.train.batch_size, "wall_s": wall,
            "epoch_s": per_epoch, "images_per_s": [n_train / t for t in per_epoch], "device": summary["device"],
            "augment": cfg.train.augment, "arch": str(cfg.model.arch)}


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="CIFAR-10 epochs (default 3, --quick 1)")
    args = p.parse_args(argv)
    set_threads(args.threads)
    device = _device()
    quick = args.quick
    info = machine_info()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    print(f"[gpu] device {device}{' (quick)' if quick else ''}", flush=True)
    batch, rounds, per_round = (16, 1, 1) if quick else (128, 10, 3)
    steps = [step_ratios("mnist", "4c3f", (1, 28, 28), batch, rounds, per_round, device),
             step_ratios("cifar10", "6c2f", (3, 32, 32), batch, rounds, per_round, device)]
    for s in steps:
        print(f"  {s['arch']} batch {s['batch']}: local/plain {s['local_over_plain']['median']:.2f}x, "
              f"local/GloRo {s['local_over_gloro']['median']:.2f}x", flush=True)
    # --quick: a 100-iteration reference (the 2000-iteration one dominates a CPU smoke run)
    cert = certification(16 if quick else 512, 1 if quick else 3, device, 100 if quick else 2000)
    print("  certification samples/s: " + ", ".join(f"{k} {v['median']:.1f}" for k, v in cert["samples_per_s"].items()),
          flush=True)
    epochs = cifar_epochs(args.epochs or (1 if quick else 3), 256 if quick else 50_000, quick)
    print(f"  CIFAR-10 6C2F: {epochs['epochs']} epochs in {epochs['wall_s']:.0f}s "
          f"({[round(v) for v in epochs['images_per_s']]} images/s)", flush=True)
    data = {"quick": quick, "machine": info, "device": str(device), "train_step": steps, "certification": cert,
            "cifar10_epochs": epochs}
    out = args.out or (WORK_DIR / "quick" / "gpu.json" if quick else None)
    write_result("gpu", json.loads(json.dumps(data, default=str)), out)
    return data


if __name__ == "__main__":
    main()
