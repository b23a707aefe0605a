"""GPU readiness, and how long the paper's CIFAR-10 recipe takes, on one device.

On a GPU machine it measures, on CUDA:

* the training step of 4C3F (MNIST shape), 6C2F and the cifar10_liresnet LiResNet (CIFAR-10
  shape), batch 128: plain cross-entropy, GloRo and the local bound (the stage's own
  ``train_step``), interleaved; ratios local/plain and local/GloRo;
* certification samples/s of the probabilistic and estimate levels and of the reference
  setting (2000 power iterations) on a 6C2F model, same points, same run;
* for each CIFAR-10 system (cifar10: Local-Lip; cifar10_gloro; cifar10_liresnet), through the
  real stages on CIFAR-10-shaped synthetic data: two epochs of ``locallip train`` (data and
  augmentation on the device), the time of one epoch and of the recipe's 800 epochs projected
  from it, and the certify and radii stages' time on 10,000 test points, projected from
  ``--test-points`` / ``--radii-points`` (both are linear in points).

``--quick`` runs the same code on small sizes (it runs on the CPU, so it cannot rot).
Writes ``bench/results/gpu.json`` (``--quick``: ``bench/out/quick/gpu.json``).

    python -m bench.gpu [--quick] [--epochs 2] [--test-points 2000] [--radii-points 500]
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


def step_ratios(experiment: str, arch: str, shape, batch: int, rounds: int, per_round: int, device,
                overrides=()) -> dict:
    from locallip.nn.models import build_model
    from locallip.foundation.compose import compose
    from locallip.training import train_step

    cfg = compose(experiment, list(overrides), config_dir=REPO / "config")
    sizes = {"depth": cfg.model.depth, "width": cfg.model.width} if str(cfg.model.arch) == arch else {}
    tc = replace(cfg.train, batch_size=batch)
    eps, kappa = float(tc.eps_train), float(tc.kappa_end)
    torch.manual_seed(0)
    base = build_model(arch, cfg.model.activation, shape, 10, cfg.model.theta_init, cfg.dataset.mean,
                       cfg.dataset.std, **sizes).to(device)
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


#: The CIFAR-10 systems whose recipe is costed: Local-Lip, the GloRo baseline, the LiResNet line.
CIFAR_SYSTEMS = ("cifar10", "cifar10_gloro", "cifar10_liresnet")
#: --quick: a LiResNet small enough for a CPU smoke run (the recipe's L12W128 takes minutes a step there).
QUICK_OVERRIDES = {"cifar10_liresnet": ["model.depth=1", "model.width=8"]}


def _synthetic_splits(n_train: int, n_val: int, n_test: int):
    import numpy as np

    from locallip.data.splits import Splits

    rng = np.random.default_rng(0)

    def images(k):
        return rng.integers(0, 256, (k, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, k).astype(np.int64)

    tx, ty = images(n_train)
    vx, vy = images(n_val)
    cx, cy = images(32)
    sx, sy = images(n_test)
    return Splits(tx, ty, vx, vy, cx, cy, sx, sy, meta={"name": "cifar10", "input_shape": [3, 32, 32],
                                                        "num_classes": 10, "source": "synthetic"})


def recipe_cost(experiment: str, epochs: int, n_train: int, n_test: int, n_radii: int, quick: bool) -> dict:
    """One system's CIFAR-10 recipe through the real stages, on CIFAR-10-shaped synthetic data:
    ``epochs`` epochs of ``locallip train`` (the time of the recipe's epochs is projected from the
    last of them: the first pays for warm-up), then the certify stage at the experiment's eps and
    the radii stage on ``n_test`` and ``n_radii`` points (the first of the same test points), projected to the 10,000-point test split (both stages
    treat points independently, in batches, so their time is linear in points). Synthetic data
    leaves the model near chance, so the certificates' *counts* mean nothing; a trained model's
    cascade may need more of its later steps, so the certify projection is a lower estimate."""
    from locallip.data.splits import save_splits
    from locallip.foundation.compose import compose
    from locallip.foundation.schema import RunConfig
    from locallip.pipeline.table import stage_config
    from locallip.stages.certify import run_certify
    from locallip.stages.radii import run_radii
    from locallip.stages.train import run_train

    recipe = compose(experiment, config_dir=REPO / "config")
    overrides = [f"train.epochs={epochs}", f"train.ramp_epochs={max(1, epochs - 1)}", "train.warmup_epochs=0",
                 "train.diagnostics_size=64", "train.val_max_iter=20"]
    overrides += QUICK_OVERRIDES.get(experiment, []) if quick else []
    cfg = compose(experiment, overrides, config_dir=REPO / "config")
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-", dir=WORK_DIR if WORK_DIR.exists() else None))
    try:
        splits = _synthetic_splits(n_train, 32 if quick else 256, n_test)
        save_splits(splits, work / "splits.npz")
        save_splits(replace(splits, test_x=splits.test_x[:n_radii], test_y=splits.test_y[:n_radii]),
                    work / "radii_splits.npz")
        run = RunConfig(progress=False)
        t0 = time.perf_counter()
        summary = run_train(stage_config(cfg, "train"), work / "splits.npz", work / "model.pt", work / "metrics.json",
                            work / "state" / "last.pt", run=run)
        train_wall = time.perf_counter() - t0
        per_epoch = [e["time_s"] for e in summary["epochs"]]
        t0 = time.perf_counter()
        run_certify(stage_config(cfg, "certify", float(cfg.eps)), work / "splits.npz", work / "model.pt",
                    work / "certify.json", work / "certify.csv", run=run)
        certify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_radii(stage_config(cfg, "radii"), work / "radii_splits.npz", work / "model.pt", work / "radii.csv", run=run)
        radii_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    epoch_s = per_epoch[-1]
    return {"experiment": experiment, "arch": str(cfg.model.arch), "overrides": overrides, "epochs": epochs,
            "train_images": n_train, "batch": cfg.train.batch_size, "train_wall_s": train_wall, "epoch_s": per_epoch,
            "images_per_s": [n_train / t for t in per_epoch], "device": summary["device"],
            "augment": cfg.train.augment, "recipe_epochs": recipe.train.epochs,
            "recipe_hours": epoch_s * recipe.train.epochs / 3600 * (50_000 / n_train),
            "test_points": n_test, "radii_points": n_radii, "certify_s": certify_s, "radii_s": radii_s,
            "certify_10k_s": certify_s * 10_000 / n_test, "radii_10k_s": radii_s * 10_000 / n_radii}


def main(argv=None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="CIFAR-10 epochs per system (default 2, --quick 1)")
    p.add_argument("--test-points", type=int, default=2000,
                   help="points of the certify stage, its time projected to 10,000 (default 2000)")
    p.add_argument("--radii-points", type=int, default=500,
                   help="points of the radii stage (a search per point), projected to 10,000 (default 500)")
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
             step_ratios("cifar10", "6c2f", (3, 32, 32), batch, rounds, per_round, device),
             step_ratios("cifar10_liresnet", "liresnet", (3, 32, 32), batch, rounds, per_round, device,
                         QUICK_OVERRIDES["cifar10_liresnet"] if quick else ())]
    for s in steps:
        print(f"  {s['experiment']} {s['arch']} batch {s['batch']}: step {s['step_s']['local']['median']:.3f}s local, "
              f"{s['step_s']['gloro']['median']:.3f}s GloRo; local/plain {s['local_over_plain']['median']:.2f}x, "
              f"local/GloRo {s['local_over_gloro']['median']:.2f}x", flush=True)
    # --quick: a 100-iteration reference (the 2000-iteration one dominates a CPU smoke run)
    cert = certification(16 if quick else 512, 1 if quick else 3, device, 100 if quick else 2000)
    print("  certification samples/s: " + ", ".join(f"{k} {v['median']:.1f}" for k, v in cert["samples_per_s"].items()),
          flush=True)
    systems = []
    for name in CIFAR_SYSTEMS:
        r = recipe_cost(name, args.epochs or (1 if quick else 2), 256 if quick else 50_000,
                        32 if quick else args.test_points, 4 if quick else args.radii_points, quick)
        systems.append(r)
        print(f"  {name} ({r['arch']}): an epoch {r['epoch_s'][-1]:.0f}s ({r['images_per_s'][-1]:.0f} images/s); "
              f"the {r['recipe_epochs']}-epoch recipe {r['recipe_hours']:.1f} h; certify "
              f"{r['certify_10k_s']:.0f}s and radii {r['radii_10k_s']:.0f}s on 10,000 points "
              f"(from {r['test_points']} and {r['radii_points']})", flush=True)
    data = {"quick": quick, "machine": info, "device": str(device), "train_step": steps, "certification": cert,
            "cifar10_recipes": systems}
    out = args.out or (WORK_DIR / "quick" / "gpu.json" if quick else None)
    write_result("gpu", json.loads(json.dumps(data, default=str)), out)
    return data


if __name__ == "__main__":
    main()
