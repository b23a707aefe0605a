"""Training with the local (Local-Lip) or global (GloRo) bound.

Schedules follow the papers: optional clean warm-up, then eps ramps from 0 to
eps_train while kappa (weight of the clean loss in the BCP mix) goes from 1 to
kappa_end; Adam with a constant learning rate, then exponential decay. The best
epoch is chosen by certified accuracy on the *validation* split.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .bounds import (converged_layer_norms, global_bound, global_margins, local_bound, local_margins,
                     network_layers, penultimate)
from .certify import evaluate
from .losses import bcp_mix_loss, gloro_loss, gloro_trades_loss, sparsity_loss
from .nn.models import LipschitzNet, build_model

Tensor = torch.Tensor


# --------------------------------------------------------------------------- schedules


def ramp_progress(epoch: float, cfg: dict) -> float:
    """Fraction of the eps ramp done at (fractional) ``epoch``: 0 during warm-up, 1 after the ramp."""
    t = epoch - cfg["warmup_epochs"]
    if t <= 0:
        return 0.0
    if cfg["ramp_epochs"] <= 0:
        return 1.0
    return min(1.0, t / cfg["ramp_epochs"])


def eps_at(epoch: float, cfg: dict) -> float:
    s = ramp_progress(epoch, cfg)
    if s <= 0:
        return 0.0
    if cfg["ramp"] == "log":  # geometric from eps_train/1000 to eps_train
        return cfg["eps_train"] * 10 ** (-3 * (1 - s))
    return cfg["eps_train"] * s


def kappa_at(epoch: float, cfg: dict) -> float:
    return 1.0 - ramp_progress(epoch, cfg) * (1.0 - cfg["kappa_end"])


def lr_at(epoch: int, cfg: dict) -> float:
    start = cfg["lr_decay_start"] or (cfg["warmup_epochs"] + cfg["ramp_epochs"])
    return cfg["lr"] * cfg["lr_decay"] ** max(0, epoch - start)


# --------------------------------------------------------------------------- one step


def training_local_bound(model: LipschitzNet, x: Tensor, eps: float, cfg: dict):
    """The local bound the training step optimises: warm-started from the global singular vectors,
    ``local_steps`` Lanczos steps (``local_solver=krylov``) or ``power_iters`` power iterations."""
    if cfg["local_solver"] == "krylov":
        return local_bound(model, x, eps, guarantee="estimate", max_iter=cfg["local_steps"], init="global",
                           method="krylov", work_dtype=None)
    return local_bound(model, x, eps, guarantee="estimate", max_iter=cfg["power_iters"], tol=0.0, init="global",
                       method="power", work_dtype=None)


def bound_diagnostics(model: LipschitzNet, x: Tensor, eps: float, cfg: dict, seed: int = 0) -> Dict[str, object]:
    """How the training-time local bound compares with the converged one, on the same masks.

    Per layer: median and worst (smallest) ratio training / converged masked norm over
    the batch; the same for their product (the whole bound); and the fixed-neuron
    fraction of every layer at radius ``eps``.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        lb = training_local_bound(model, x, eps, cfg)
        ref = converged_layer_norms(lb, model, generator=torch.Generator().manual_seed(seed))
    model.train(was_training)
    ratio = lb.layer_norms / ref.clamp_min(torch.finfo(ref.dtype).tiny)
    total = lb.layer_norms.prod(1) / ref.prod(1).clamp_min(torch.finfo(ref.dtype).tiny)
    return {"bound_ratio_layers_median": [float(r.median()) for r in ratio.unbind(1)],
            "bound_ratio_layers_worst": [float(r.min()) for r in ratio.unbind(1)],
            "bound_ratio_median": float(total.median()), "bound_ratio_worst": float(total.min()),
            "fixed_per_layer_val": lb.fixed_fraction_per_layer()}


def robust_loss(model: LipschitzNet, x: Tensor, y: Tensor, eps: float, kappa: float, cfg: dict
                ) -> Tuple[Tensor, Dict[str, float]]:
    """Training loss at radius eps with the configured bound and loss."""
    if eps <= 0 and kappa >= 1 and cfg["loss"] == "bcp_mix":
        logits = model(x)
        return F.cross_entropy(logits, y), {}
    stats: Dict[str, float] = {}
    if cfg["bound"] == "local":
        with torch.no_grad():  # keep the global singular vectors (the local warm start) fresh
            global_bound(model, method="power", iters=1)
        lb = training_local_bound(model, x, eps, cfg)
        logits = lb.logits
        margins = local_margins(model, lb, y, cfg["last_layer"])
        stats["fixed_fraction"] = lb.fixed_fraction()
        stats["fixed_per_layer"] = lb.fixed_fraction_per_layer()
        extra = 0.0
        if cfg["sparsity_weight"] > 0:
            _, acts = network_layers(model)
            extra = cfg["sparsity_weight"] * sparsity_loss(lb.pre_bounds, acts)
    else:
        g = global_bound(model, method="power", iters=cfg["power_iters"])
        features = penultimate(model, x)
        logits = network_layers(model)[0][-1].forward(features)
        margins = global_margins(model, logits, features, y, g.lipschitz, eps)
        extra = 0.0
    if cfg["loss"] == "bcp_mix":
        loss = bcp_mix_loss(logits, margins, y, kappa)
    elif cfg["loss"] == "gloro":
        loss = gloro_loss(logits, margins, y)
    else:
        loss = gloro_trades_loss(logits, margins, y, cfg["trades_lambda"])
    return loss + extra, stats


def clamp_thresholds(model: nn.Module) -> None:
    for m in model.modules():
        if getattr(m, "has_thresholds", False):
            m.clamp_thresholds_()


def threshold_mean(model: nn.Module) -> Optional[float]:
    vals = [m.threshold_mean() for m in model.modules() if getattr(m, "has_thresholds", False)]
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------- the stage


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _run_signature(cfg: dict, data_meta: dict) -> dict:
    """What must match for a resume checkpoint to be reused."""
    return {"model": cfg["model"], "train": {k: v for k, v in cfg["train"].items() if k != "progress"},
            "dataset": cfg["dataset"], "data": data_meta.get("sha256", data_meta.get("sizes"))}


def build_for_data(cfg: dict, meta: dict) -> LipschitzNet:
    m, ds = cfg["model"], cfg["dataset"]
    return build_model(m["arch"], m["activation"], meta["input_shape"], meta["num_classes"], m["theta_init"],
                       ds.get("mean", []), ds.get("std", []))


def run_train(cfg: dict, data: Path, out: Path, metrics: Path, state: Path) -> dict:
    """Train stage: splits -> best checkpoint (by validation certified accuracy) + metrics JSON.

    Writes a resume checkpoint to ``state`` after every epoch (atomically); a
    rerun with the same configuration and data resumes from it.
    """
    from tqdm import tqdm

    from .checkpoints import load_model, save_model
    from .data import augment, load_splits, to_tensors
    from .io import CheckpointError, load_checkpoint, save_checkpoint, write_json

    tc = cfg["train"]
    if tc["num_threads"] > 0:
        torch.set_num_threads(tc["num_threads"])
    splits = load_splits(data)
    device = _device(tc["device"])
    x_train, y_train = to_tensors(splits.train_x, splits.train_y)
    x_val, y_val = to_tensors(splits.val_x, splits.val_y)
    signature = _run_signature(cfg, splits.meta)

    torch.manual_seed(tc["seed"])
    model = build_for_data(cfg, splits.meta).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    gen = torch.Generator().manual_seed(tc["seed"])
    history, best, start_epoch = [], {"epoch": -1, "certified_acc": -1.0, "clean_acc": -1.0}, 0
    best_path = Path(state).with_name("best.pt")

    if Path(state).exists():
        try:
            ck = load_checkpoint(state, map_location=device)
            if ck.get("signature") == signature:
                model.load_state_dict(ck["state_dict"])
                opt.load_state_dict(ck["optimizer"])
                gen.set_state(ck["generator"])
                torch.set_rng_state(ck["torch_rng"])
                history, best, start_epoch = ck["history"], ck["best"], int(ck["epoch"]) + 1
                print(f"[train] resuming {cfg['name']} from epoch {start_epoch} ({state})")
            else:
                print(f"[train] {state} was written for another configuration or data; starting afresh")
        except CheckpointError as e:
            print(f"[train] ignoring unreadable resume checkpoint: {e}")

    n = x_train.shape[0]
    bs = tc["batch_size"]
    steps = math.ceil(n / bs)
    t_start = time.perf_counter() - sum(h["time_s"] for h in history)
    for epoch in range(start_epoch, tc["epochs"]):
        t0 = time.perf_counter()
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, tc)
        perm = torch.randperm(n, generator=gen)
        total, fixed, fixed_layers, count = 0.0, [], [], 0
        bar = tqdm(range(steps), desc=f"{cfg['name']} epoch {epoch + 1}/{tc['epochs']}",
                   disable=None if tc["progress"] else True, unit="step", leave=False)
        for i in bar:
            idx = perm[i * bs:(i + 1) * bs]
            xb, yb = x_train[idx], y_train[idx]
            if tc["augment"]:
                xb = augment(xb, gen)
            xb, yb = xb.to(device), yb.to(device)
            progress = epoch + i / steps
            eps, kappa = eps_at(progress, tc), kappa_at(progress, tc)
            loss, stats = robust_loss(model, xb, yb, eps, kappa, tc)
            if not torch.isfinite(loss):
                raise RuntimeError(f"training diverged at epoch {epoch + 1}, step {i + 1}: loss {float(loss)}; "
                                   f"lower train.lr or raise train.ramp_epochs")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            clamp_thresholds(model)
            total += float(loss.detach()) * xb.shape[0]
            count += xb.shape[0]
            if "fixed_fraction" in stats:
                fixed.append(stats["fixed_fraction"])
                fixed_layers.append(stats["fixed_per_layer"])
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", eps=f"{eps:.3f}")
        bar.close()
        record = {"epoch": epoch + 1, "loss": total / max(count, 1), "eps": eps_at(epoch + 1, tc),
                  "kappa": kappa_at(epoch + 1, tc), "lr": lr_at(epoch, tc), "theta_mean": threshold_mean(model),
                  "fixed_fraction": sum(fixed) / len(fixed) if fixed else None,
                  "fixed_per_layer": ([sum(col) / len(col) for col in zip(*fixed_layers)] if fixed_layers else None)}
        if tc["bound"] == "local" and eps_at(epoch + 1, tc) > 0 and tc["diagnostics_size"] > 0:
            record.update(bound_diagnostics(model, x_val[:tc["diagnostics_size"]].to(device),
                                            eps_at(epoch + 1, tc), tc, seed=tc["seed"]))
        # Only epochs that reached the full training radius compete for "best" (earlier ones are
        # trained for a smaller eps), so only those are certified on the validation split.
        last = epoch + 1 == tc["epochs"]
        eligible = ramp_progress(epoch + 1, tc) >= 1.0 or last
        if eligible and ((epoch + 1) % tc["val_every"] == 0 or last):
            model.eval()
            ev = evaluate(model, x_val, y_val, tc["eps"], tc["bound"], max_iter=tc["val_max_iter"], tol=1e-3)
            record.update(val_clean_acc=ev["clean_acc"], val_certified_acc=ev["certified_acc"])
            if (ev["certified_acc"], ev["clean_acc"]) >= (best["certified_acc"], best["clean_acc"]):
                best = {"epoch": epoch + 1, **ev}  # ties go to the later epoch
                save_model(best_path, model, train=dict(tc), epoch=epoch + 1, validation=ev)
        else:
            record.update(val_clean_acc=None, val_certified_acc=None)
        record["time_s"] = time.perf_counter() - t0
        history.append(record)
        save_checkpoint(state, {"format": "locallip-train-state-1", "spec": dict(model.spec),
                                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                "optimizer": opt.state_dict(), "generator": gen.get_state(),
                                "torch_rng": torch.get_rng_state(), "history": history, "best": best,
                                "epoch": epoch, "signature": signature})
        val = ("" if record["val_certified_acc"] is None else
               f" val clean {record['val_clean_acc']:.4f} certified {record['val_certified_acc']:.4f}")
        print(f"[train] {cfg['name']} epoch {epoch + 1}/{tc['epochs']}: loss {record['loss']:.4f} "
              f"eps {record['eps']:.3f}{val} ({record['time_s']:.1f}s)", flush=True)

    best_model, best_ck = load_model(best_path)
    save_model(out, best_model, train=dict(tc), epoch=best["epoch"], validation=best_ck.get("validation", {}),
               experiment=cfg["name"])
    summary = {"experiment": cfg["name"], "epochs": history, "best_epoch": best["epoch"],
               "best_validation": best, "device": str(device), "torch": torch.__version__,
               "train_time_s": time.perf_counter() - t_start, "bound": tc["bound"], "loss": tc["loss"],
               "params": sum(p.numel() for p in model.parameters()), "train_size": n}
    write_json(metrics, summary)
    print(f"[train] {cfg['name']}: best epoch {best['epoch']} (validation certified {best['certified_acc']:.4f}, "
          f"clean {best['clean_acc']:.4f}) -> {out}")
    return summary
