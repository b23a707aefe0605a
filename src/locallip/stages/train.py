"""The train stage: a model trained with the local (Local-Lip) or global (GloRo) bound.

Schedules follow the papers: optional clean warm-up, then eps ramps from 0 to
eps_train while kappa (weight of the clean loss in the BCP mix) goes from 1 to
kappa_end; Adam with a constant learning rate, then exponential decay. The best
epoch is chosen by certified accuracy on the *validation* split. A resume
checkpoint is written after every epoch; only an unfinished run with the same
settings, data and code is resumed.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..bounds import (converged_layer_norms, global_bound, global_margins, local_bound, local_margins,
                      network_layers, penultimate)
from ..certify.evaluate import evaluate
from ..data.splits import augment, load_splits, to_tensors
from ..distributed import Group, process_group, set_threads
from ..losses import bcp_mix_loss, gloro_loss, gloro_trades_loss, sparsity_loss
from ..nn.activations import clamp_thresholds, threshold_mean
from ..nn.models import LipschitzNet, build_model
from ..pipeline.checkpoints import CheckpointError, load_checkpoint, load_model, save_checkpoint, save_model
from ..pipeline.config import RunConfig, TrainConfig, TrainStage, plain
from ..pipeline.dag import code_version
from ..pipeline.files import stage_lock, write_json

Tensor = torch.Tensor
STATE_FORMAT = "locallip-train-state-2"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# --------------------------------------------------------------------------- schedules


def ramp_progress(epoch: float, tc: TrainConfig) -> float:
    """Fraction of the eps ramp done at (fractional) ``epoch``: 0 during warm-up, 1 after the ramp."""
    t = epoch - tc.warmup_epochs
    if t <= 0:
        return 0.0
    if tc.ramp_epochs <= 0:
        return 1.0
    return min(1.0, t / tc.ramp_epochs)


def eps_at(epoch: float, tc: TrainConfig) -> float:
    s = ramp_progress(epoch, tc)
    if s <= 0:
        return 0.0
    if tc.ramp == "log":  # geometric from eps_train/1000 to eps_train
        return tc.eps_train * 10 ** (-3 * (1 - s))
    return tc.eps_train * s


def kappa_at(epoch: float, tc: TrainConfig) -> float:
    return 1.0 - ramp_progress(epoch, tc) * (1.0 - tc.kappa_end)


def lr_at(epoch: int, tc: TrainConfig) -> float:
    start = tc.lr_decay_start or (tc.warmup_epochs + tc.ramp_epochs)
    return tc.lr * tc.lr_decay ** max(0, epoch - start)


# --------------------------------------------------------------------------- one step


def training_local_bound(model: LipschitzNet, x: Tensor, eps: float, tc: TrainConfig):
    """The local bound the training step optimises: warm-started from the global singular vectors,
    ``local_steps`` Lanczos steps (``local_solver=krylov``) or ``power_iters`` power iterations."""
    adaptive = dict(masked_norms=str(tc.masked_norms), adaptive_tol=tc.adaptive_tol)
    if tc.local_solver == "krylov":
        return local_bound(model, x, eps, guarantee="estimate", steps=tc.local_steps, init="global",
                           method="krylov", work_dtype=None, **adaptive)
    return local_bound(model, x, eps, guarantee="estimate", max_iter=tc.power_iters, tol=0.0, init="global",
                       method="power", work_dtype=None, **adaptive)


def bound_diagnostics(model: LipschitzNet, x: Tensor, eps: float, tc: TrainConfig,
                      seed: int = 0) -> Dict[str, object]:
    """How the training-time local bound compares with the converged one, on the same masks.

    Per layer: median and worst (smallest) ratio training / converged masked norm over
    the batch; the same for their product (the whole bound); and the fixed-neuron
    fraction of every layer at radius ``eps``.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        lb = training_local_bound(model, x, eps, tc)
        ref = converged_layer_norms(lb, model, generator=torch.Generator().manual_seed(seed))
    model.train(was_training)
    tiny = torch.finfo(ref.dtype).tiny
    ratio = lb.layer_norms / ref.clamp_min(tiny)
    total = lb.layer_norms.prod(1) / ref.prod(1).clamp_min(tiny)
    return {"bound_ratio_layers_median": [float(r.median()) for r in ratio.unbind(1)],
            "bound_ratio_layers_worst": [float(r.min()) for r in ratio.unbind(1)],
            "bound_ratio_median": float(total.median()), "bound_ratio_worst": float(total.min()),
            "fixed_per_layer_val": lb.fixed_fraction_per_layer()}


def robust_loss(model: LipschitzNet, x: Tensor, y: Tensor, eps: float, kappa: float, tc: TrainConfig
                ) -> Tuple[Tensor, Dict[str, object]]:
    """Training loss at radius eps with the configured bound and loss."""
    if eps <= 0 and kappa >= 1 and tc.loss == "bcp_mix":
        return F.cross_entropy(model(x), y), {}
    stats: Dict[str, object] = {}
    extra: Tensor | float = 0.0
    if tc.bound == "local":
        with torch.no_grad():  # keep the global singular vectors (the local warm start) fresh
            global_bound(model, method="power", iters=1)
        lb = training_local_bound(model, x, eps, tc)
        logits = lb.logits
        margins = local_margins(model, lb, y, tc.last_layer)
        stats["fixed_fraction"] = lb.fixed_fraction()
        stats["fixed_per_layer"] = lb.fixed_fraction_per_layer()
        stats["masked_per_layer"] = list(lb.info.get("masked_fraction") or [])
        if tc.sparsity_weight > 0:
            _, acts = network_layers(model)
            extra = tc.sparsity_weight * sparsity_loss(lb.pre_bounds, acts)
    else:
        g = global_bound(model, method="power", iters=tc.power_iters)
        features = penultimate(model, x)
        logits = network_layers(model)[0][-1].forward(features)
        margins = global_margins(model, logits, features, y, g.lipschitz, eps)
    if tc.loss == "bcp_mix":
        loss = bcp_mix_loss(logits, margins, y, kappa)
    elif tc.loss == "gloro":
        loss = gloro_loss(logits, margins, y)
    else:
        loss = gloro_trades_loss(logits, margins, y, tc.trades_lambda)
    return loss + extra, stats


class Objective(torch.nn.Module):
    """The training loss as a module, so that DistributedDataParallel can wrap it (its forward
    prepares the gradient all-reduce). An empty shard gives a zero loss that still reaches every
    parameter, so every rank joins the all-reduce."""

    def __init__(self, model: LipschitzNet, tc: TrainConfig):
        super().__init__()
        self.model, self.tc = model, tc

    def forward(self, x: Tensor, y: Tensor, eps: float, kappa: float):
        if x.shape[0] == 0:
            return sum((p * 0).sum() for p in self.model.parameters()), {}
        return robust_loss(self.model, x, y, eps, kappa, self.tc)


def train_step(model: LipschitzNet, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, eps: float, kappa: float,
               tc: TrainConfig, objective: Optional[torch.nn.Module] = None,
               scale: float = 1.0) -> Tuple[float, Dict[str, object]]:
    """One optimisation step on (x, y); thresholds kept >= 0. Returns the loss and statistics.

    ``objective``: the loss module wrapped for data parallelism (None: this process alone);
    ``scale``: this shard's share of the global batch times the number of ranks, so that the
    averaged gradient is the gradient of the global batch mean.
    """
    loss, stats = (objective or Objective(model, tc))(x, y, eps, kappa)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"loss {float(loss)} at eps {eps:.4g}")
    opt.zero_grad(set_to_none=True)
    (loss * scale if scale != 1.0 else loss).backward()
    opt.step()
    clamp_thresholds(model)
    return float(loss.detach()), stats


# --------------------------------------------------------------------------- the stage


def _device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_for_data(cfg: TrainStage, meta: dict) -> LipschitzNet:
    m = cfg.model
    return build_model(m.arch, m.activation, meta["input_shape"], meta["num_classes"], m.theta_init,
                       cfg.normalization.mean, cfg.normalization.std)


@dataclass
class _Resume:
    history: List[dict]
    best: dict
    start_epoch: int


def _resume(state: Path, signature: dict, epochs: int, model, opt, gen, device, name: str) -> Optional[_Resume]:
    """Restore an unfinished run with the same signature from ``state``; None to start afresh."""
    if not state.exists():
        return None
    try:
        ck = load_checkpoint(state, map_location=device)
    except CheckpointError as e:
        print(f"[train] ignoring unreadable resume checkpoint: {e}")
        return None
    if ck.get("format") != STATE_FORMAT or ck.get("signature") != signature:
        print(f"[train] {state} was written for other settings, data or code; starting afresh")
        return None
    if int(ck["epoch"]) + 1 >= epochs:
        print(f"[train] {state} is a finished run; retraining from scratch")
        return None
    model.load_state_dict(ck["state_dict"])
    opt.load_state_dict(ck["optimizer"])
    gen.set_state(ck["generator"])
    torch.set_rng_state(ck["torch_rng"])
    print(f"[train] resuming {name} from epoch {int(ck['epoch']) + 2} ({state})")
    return _Resume(ck["history"], ck["best"], int(ck["epoch"]) + 1)


def run_train(cfg: TrainStage, data: Path, out: Path, metrics: Path, state: Path,
              run: RunConfig = RunConfig()) -> dict:
    """Train stage: splits -> best checkpoint (by validation certified accuracy) + metrics JSON.

    Holds a lock on ``out`` for the whole run: a second run on the same output fails at once.
    Under torchrun each rank trains on its shard of every batch (gradients averaged over the
    global batch); rank 0 validates, chooses the epoch and writes every file.
    """
    with process_group(str(cfg.train.device)) as group:
        with (stage_lock(out, "train") if group.main else nullcontext()):
            result = _train(cfg, Path(data), Path(out), Path(metrics), Path(state), run, group)
        group.barrier()
    return result


def _train(cfg: TrainStage, data: Path, out: Path, metrics: Path, state: Path, run: RunConfig, group: Group) -> dict:
    from tqdm import tqdm

    tc = cfg.train
    set_threads(run.threads, group)
    splits = load_splits(data)
    device = _device(tc.device, group.local_rank)
    # uint8 images, converted per batch; on a GPU they live on it (CIFAR-10: 150 MB), so batches
    # and augmentation never wait on host transfers.
    x_train = torch.from_numpy(splits.train_x).to(device)
    y_train = torch.from_numpy(splits.train_y).to(device)
    x_val, y_val = to_tensors(splits.val_x, splits.val_y)
    version = code_version("train")
    signature = {"settings": plain(cfg), "data": splits.meta.get("sha256", splits.meta.get("sizes")),
                 "code": version}

    torch.manual_seed(tc.seed)
    model = build_for_data(cfg, splits.meta).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    objective = None
    if group.active:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(Objective(model, tc), device_ids=[device.index] if device.type == "cuda"
                                            else None)
    gen = torch.Generator().manual_seed(tc.seed)
    best_path = state.with_name("best.pt")
    resumed = _resume(state, signature, tc.epochs, model, opt, gen, device, cfg.name)
    if resumed is None:
        history, best, start_epoch = [], {"epoch": -1, "certified_acc": -1.0, "clean_acc": -1.0}, 0
        best_path.unlink(missing_ok=True)  # a previous run's best epoch is not this run's
    else:
        history, best, start_epoch = resumed.history, resumed.best, resumed.start_epoch

    n = x_train.shape[0]
    bs = tc.batch_size
    steps = math.ceil(n / bs)
    t_start = time.perf_counter() - sum(h["time_s"] for h in history)
    for epoch in range(start_epoch, tc.epochs):
        t0 = time.perf_counter()
        model.train()
        for pg in opt.param_groups:
            pg["lr"] = lr_at(epoch, tc)
        perm = torch.randperm(n, generator=gen)
        total, fixed, fixed_layers, masked_layers, count = 0.0, [], [], [], 0
        bar = tqdm(range(steps), desc=f"{cfg.name} epoch {epoch + 1}/{tc.epochs}",
                   disable=None if (run.progress and group.main) else True, unit="step", leave=False)
        for i in bar:
            idx = perm[i * bs:(i + 1) * bs].to(device)
            xb, yb = x_train[idx].to(torch.float32).div_(255.0), y_train[idx]
            if tc.augment:  # the whole global batch on every rank: the generator stays in step
                xb = augment(xb, gen)
            mine = torch.arange(group.rank, xb.shape[0], group.world, device=device)
            xs, ys = xb[mine], yb[mine]
            progress = epoch + i / steps
            eps, kappa = eps_at(progress, tc), kappa_at(progress, tc)
            try:
                loss, stats = train_step(model, opt, xs, ys, eps, kappa, tc, objective=objective,
                                         scale=xs.shape[0] * group.world / xb.shape[0])
            except TrainingDiverged as e:
                raise TrainingDiverged(f"training diverged at epoch {epoch + 1}, step {i + 1}: {e}; lower "
                                       f"train.lr or raise train.ramp_epochs (the resume checkpoint keeps the "
                                       f"last finished epoch)") from None
            total += loss * xs.shape[0]
            count += xs.shape[0]
            if "fixed_fraction" in stats:
                fixed.append(stats["fixed_fraction"])
                fixed_layers.append(stats["fixed_per_layer"])
                masked_layers.append(stats["masked_per_layer"])
            bar.set_postfix(loss=f"{loss:.3f}", eps=f"{eps:.3f}")
        bar.close()
        total, count = group.sum([total, float(count)])
        record = {"epoch": epoch + 1, "loss": total / max(count, 1), "eps": eps_at(epoch + 1, tc),
                  "kappa": kappa_at(epoch + 1, tc), "lr": lr_at(epoch, tc), "theta_mean": threshold_mean(model),
                  "fixed_fraction": sum(fixed) / len(fixed) if fixed else None,
                  "fixed_per_layer": [sum(c) / len(c) for c in zip(*fixed_layers)] if fixed_layers else None,
                  # share of the samples the masked solver ran for, per layer (1: always; 0: never)
                  "masked_per_layer": [sum(c) / len(c) for c in zip(*masked_layers)] if masked_layers else None}
        if group.main and tc.bound == "local" and eps_at(epoch + 1, tc) > 0 and tc.diagnostics_size > 0:
            record.update(bound_diagnostics(model, x_val[:tc.diagnostics_size].to(device), eps_at(epoch + 1, tc),
                                            tc, seed=tc.seed))
        # Only epochs that reached the full training radius compete for "best" (earlier ones are
        # trained for a smaller eps), so only those are certified on the validation split.
        last = epoch + 1 == tc.epochs
        eligible = ramp_progress(epoch + 1, tc) >= 1.0 or last
        if group.main and eligible and ((epoch + 1) % tc.val_every == 0 or last):
            model.eval()
            ev = evaluate(model, x_val, y_val, tc.eps, tc.bound, max_iter=tc.val_max_iter, tol=1e-3)
            record.update(val_clean_acc=ev["clean_acc"], val_certified_acc=ev["certified_acc"])
            if (ev["certified_acc"], ev["clean_acc"]) >= (best["certified_acc"], best["clean_acc"]):
                best = {"epoch": epoch + 1, **ev}  # ties go to the later epoch
                save_model(best_path, model, train=plain(tc), epoch=epoch + 1, validation=ev)
        else:
            record.update(val_clean_acc=None, val_certified_acc=None)
        record["time_s"] = time.perf_counter() - t0
        history.append(record)
        if not group.main:
            continue
        save_checkpoint(state, {"format": STATE_FORMAT, "spec": dict(model.spec),
                                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                "optimizer": opt.state_dict(), "generator": gen.get_state(),
                                "torch_rng": torch.get_rng_state(), "history": history, "best": best,
                                "epoch": epoch, "signature": signature})
        val = ("" if record["val_certified_acc"] is None else
               f" val clean {record['val_clean_acc']:.4f} certified {record['val_certified_acc']:.4f}")
        print(f"[train] {cfg.name} epoch {epoch + 1}/{tc.epochs}: loss {record['loss']:.4f} "
              f"eps {record['eps']:.3f}{val} ({record['time_s']:.1f}s)", flush=True)

    if not group.main:
        return {}
    best_model, best_ck = load_model(best_path)
    save_model(out, best_model, train=plain(tc), epoch=best["epoch"], validation=best_ck.get("validation", {}),
               experiment=cfg.name, code_version=version, settings=plain(cfg))
    summary = {"experiment": cfg.name, "epochs": history, "best_epoch": best["epoch"],
               "best_validation": best, "device": str(device), "torch": torch.__version__,
               "train_time_s": time.perf_counter() - t_start, "bound": str(tc.bound), "loss": str(tc.loss),
               "params": sum(p.numel() for p in model.parameters()), "train_size": n, "code_version": version,
               "settings": plain(cfg), "processes": group.world}
    write_json(metrics, summary)
    print(f"[train] {cfg.name}: best epoch {best['epoch']} (validation certified {best['certified_acc']:.4f}, "
          f"clean {best['clean_acc']:.4f}) -> {out}")
    return summary
