"""The train stage: a model trained with the local (Local-Lip) or global (GloRo) bound.

The step, its loss and schedules are the library's (``locallip.training``). The best epoch
is chosen by certified accuracy on the *validation* split. A resume checkpoint is written
after every epoch; only an unfinished run with the same settings, data and code is
resumed. Nothing of an earlier run is removed before this run has succeeded: its best
checkpoint is kept under a name of its own run signature until the end.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from ..certify.evaluate import evaluate
from ..data.splits import augment, load_splits, to_tensors
from ..distributed import Group, choose_device, process_group, set_threads
from ..foundation.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from ..foundation.compose import plain
from ..foundation.files import keep_copy, stage_lock, write_json
from ..foundation.layout import last_good
from ..foundation.provenance import code_version
from ..foundation.schema import RunConfig, TrainStage
from ..nn.activations import threshold_mean
from ..nn.checkpoint import load_model, save_model
from ..nn.models import LipschitzNet, build_model
from ..training import (Objective, TrainingDiverged, bound_diagnostics, eps_at, kappa_at, lr_at, ramp_progress,
                        train_step)

STATE_FORMAT = "locallip-train-state-2"


def build_for_data(cfg: TrainStage, meta: dict) -> LipschitzNet:
    m = cfg.model
    return build_model(m.arch, m.activation, meta["input_shape"], meta["num_classes"], m.theta_init,
                       cfg.normalization.mean, cfg.normalization.std, depth=m.depth, width=m.width)


@dataclass
class _Run:
    """One training run's state: what is trained, on what, and what it has done so far."""

    cfg: TrainStage
    model: LipschitzNet
    opt: torch.optim.Optimizer
    gen: torch.Generator
    device: torch.device
    signature: dict
    best_path: Path
    history: List[dict]
    best: dict
    start_epoch: int
    objective: Optional[torch.nn.Module] = None


def _resume(run: _Run, state: Path) -> None:
    """Restore an unfinished run with the same signature from ``state`` (else start afresh)."""
    if not state.exists():
        return
    try:
        ck = load_checkpoint(state, map_location=run.device)
    except CheckpointError as e:
        print(f"[train] ignoring unreadable resume checkpoint: {e}")
        return
    if ck.get("format") != STATE_FORMAT or ck.get("signature") != run.signature:
        print(f"[train] {state} was written for other settings, data or code; starting afresh")
        return
    if int(ck["epoch"]) + 1 >= run.cfg.train.epochs:
        print(f"[train] {state} is a finished run; retraining from scratch")
        return
    run.model.load_state_dict(ck["state_dict"])
    run.opt.load_state_dict(ck["optimizer"])
    run.gen.set_state(ck["generator"])
    torch.set_rng_state(ck["torch_rng"])
    print(f"[train] resuming {run.cfg.name} from epoch {int(ck['epoch']) + 2} ({state})")
    run.history, run.best, run.start_epoch = ck["history"], ck["best"], int(ck["epoch"]) + 1


def run_train(cfg: TrainStage, data: Path, out: Path, metrics: Path, state: Path,
              run: RunConfig = RunConfig()) -> dict:
    """Train stage: splits -> best checkpoint (by validation certified accuracy) + metrics JSON.

    Holds a lock on ``out`` for the whole run: a second run on the same output fails at once.
    Under torchrun each rank trains on its shard of every batch (gradients averaged over the
    global batch); rank 0 validates, chooses the epoch and writes every file.
    """
    with process_group(str(cfg.train.device)) as group:
        with (stage_lock(out, "train") if group.main else nullcontext()):
            try:
                result = _train(cfg, Path(data), Path(out), Path(metrics), Path(state), run, group)
            except (TrainingDiverged, ValueError, CheckpointError, FileNotFoundError) as e:
                _name_the_kept_copy(e, Path(out))
                raise
        group.barrier()
    return result


def _name_the_kept_copy(e: Exception, out: Path) -> None:
    """Say in the error where the last good model is, when a run fails and its outputs may be gone
    (Snakemake and DVC remove a job's outputs before running it)."""
    kept = last_good(out)
    if (kept / out.name).is_file() and len(e.args) == 1 and isinstance(e.args[0], str):
        e.args = (f"{e.args[0]} (the last completed run's model and metrics are kept in {kept}/)",)


def _start(cfg: TrainStage, splits, state: Path, group: Group) -> _Run:
    tc = cfg.train
    device = choose_device(str(tc.device), group.local_rank)
    signature = {"settings": plain(cfg), "data": splits.meta.get("sha256", splits.meta.get("sizes")),
                 "code": code_version("stages.train")}
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:12]
    torch.manual_seed(tc.seed)
    model = build_for_data(cfg, splits.meta).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    run = _Run(cfg, model, opt, torch.Generator().manual_seed(tc.seed), device, signature,
               state.with_name(f"best-{digest}.pt"), [], {"epoch": -1, "certified_acc": -1.0, "clean_acc": -1.0}, 0)
    if group.active:
        from torch.nn.parallel import DistributedDataParallel

        run.objective = DistributedDataParallel(Objective(model, tc),
                                                device_ids=[device.index] if device.type == "cuda" else None)
    _resume(run, state)
    return run


def _train(cfg: TrainStage, data: Path, out: Path, metrics: Path, state: Path, run_cfg: RunConfig,
           group: Group) -> dict:
    set_threads(run_cfg.threads, group)
    splits = load_splits(data)
    run = _start(cfg, splits, state, group)
    # uint8 images, converted per batch; on a GPU they live on it (CIFAR-10: 150 MB), so batches
    # and augmentation never wait on host transfers.
    x_train = torch.from_numpy(splits.train_x).to(run.device)
    y_train = torch.from_numpy(splits.train_y).to(run.device)
    x_val, y_val = to_tensors(splits.val_x, splits.val_y)
    t_start = time.perf_counter() - sum(h["time_s"] for h in run.history)
    for epoch in range(run.start_epoch, cfg.train.epochs):
        t0 = time.perf_counter()
        record = _epoch(run, epoch, x_train, y_train, run_cfg, group)
        if group.main:
            _validate(run, epoch, record, x_val, y_val)
        record["time_s"] = time.perf_counter() - t0
        run.history.append(record)
        if group.main:
            _save_state(run, state, epoch)
            val = ("" if record["val_certified_acc"] is None else
                   f" val clean {record['val_clean_acc']:.4f} certified {record['val_certified_acc']:.4f}")
            print(f"[train] {cfg.name} epoch {epoch + 1}/{cfg.train.epochs}: loss {record['loss']:.4f} "
                  f"eps {record['eps']:.3f}{val} ({record['time_s']:.1f}s)", flush=True)
    if not group.main:
        return {}
    return _finish(run, out, metrics, time.perf_counter() - t_start, x_train.shape[0], group)


def _epoch(run: _Run, epoch: int, x_train, y_train, run_cfg: RunConfig, group: Group) -> dict:
    """One epoch of steps; the epoch's record (loss, schedule, fixed and masked shares per layer)."""
    from tqdm import tqdm

    tc = run.cfg.train
    run.model.train()
    for pg in run.opt.param_groups:
        pg["lr"] = lr_at(epoch, tc)
    n, bs = x_train.shape[0], tc.batch_size
    steps = math.ceil(n / bs)
    perm = torch.randperm(n, generator=run.gen)
    total, count, fixed, fixed_layers, masked_layers = 0.0, 0, [], [], []
    bar = tqdm(range(steps), desc=f"{run.cfg.name} epoch {epoch + 1}/{tc.epochs}",
               disable=None if (run_cfg.progress and group.main) else True, unit="step", leave=False)
    for i in bar:
        idx = perm[i * bs:(i + 1) * bs].to(run.device)
        xb, yb = x_train[idx].to(torch.float32).div_(255.0), y_train[idx]
        if tc.augment:  # the whole global batch on every rank: the generator stays in step
            xb = augment(xb, run.gen)
        mine = torch.arange(group.rank, xb.shape[0], group.world, device=run.device)
        xs, ys = xb[mine], yb[mine]
        progress = epoch + i / steps
        eps, kappa = eps_at(progress, tc), kappa_at(progress, tc)
        try:
            loss, stats = train_step(run.model, run.opt, xs, ys, eps, kappa, tc, objective=run.objective,
                                     scale=xs.shape[0] * group.world / xb.shape[0])
        except TrainingDiverged as e:
            raise TrainingDiverged(f"training diverged at epoch {epoch + 1}, step {i + 1}: {e}; lower "
                                   f"train.lr or raise train.ramp_epochs (the resume checkpoint keeps the "
                                   f"last finished epoch)") from None
        total, count = total + loss * xs.shape[0], count + xs.shape[0]
        if "fixed_fraction" in stats:
            fixed.append(stats["fixed_fraction"])
            fixed_layers.append(stats["fixed_per_layer"])
            masked_layers.append(stats["masked_per_layer"])
        bar.set_postfix(loss=f"{loss:.3f}", eps=f"{eps:.3f}")
    bar.close()
    total, count = group.sum([total, float(count)])

    def mean(rows):
        return [sum(c) / len(c) for c in zip(*rows)] if rows else None

    return {"epoch": epoch + 1, "loss": total / max(count, 1), "eps": eps_at(epoch + 1, tc),
            "kappa": kappa_at(epoch + 1, tc), "lr": lr_at(epoch, tc), "theta_mean": threshold_mean(run.model),
            "fixed_fraction": sum(fixed) / len(fixed) if fixed else None, "fixed_per_layer": mean(fixed_layers),
            # share of the samples the masked solver ran for, per layer (1: always; 0: never)
            "masked_per_layer": mean(masked_layers)}


def _validate(run: _Run, epoch: int, record: dict, x_val, y_val) -> None:
    """Bound diagnostics, and (on epochs at the full training radius) validation and the best epoch."""
    tc = run.cfg.train
    if tc.bound == "local" and eps_at(epoch + 1, tc) > 0 and tc.diagnostics_size > 0:
        record.update(bound_diagnostics(run.model, x_val[:tc.diagnostics_size].to(run.device), eps_at(epoch + 1, tc),
                                        tc, seed=tc.seed))
    # Only epochs that reached the full training radius compete for "best" (earlier ones are
    # trained for a smaller eps), so only those are certified on the validation split.
    last = epoch + 1 == tc.epochs
    eligible = ramp_progress(epoch + 1, tc) >= 1.0 or last
    record.update(val_clean_acc=None, val_certified_acc=None)
    if eligible and ((epoch + 1) % tc.val_every == 0 or last):
        run.model.eval()
        ev = evaluate(run.model, x_val, y_val, tc.eps, tc.bound, max_iter=tc.val_max_iter, tol=1e-3)
        record.update(val_clean_acc=ev["clean_acc"], val_certified_acc=ev["certified_acc"])
        if (ev["certified_acc"], ev["clean_acc"]) >= (run.best["certified_acc"], run.best["clean_acc"]):
            run.best = {"epoch": epoch + 1, **ev}  # ties go to the later epoch
            save_model(run.best_path, run.model, train=plain(tc), epoch=epoch + 1, validation=ev)


def _save_state(run: _Run, state: Path, epoch: int) -> None:
    save_checkpoint(state, {"format": STATE_FORMAT, "spec": dict(run.model.spec),
                            "state_dict": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
                            "optimizer": run.opt.state_dict(), "generator": run.gen.get_state(),
                            "torch_rng": torch.get_rng_state(), "history": run.history, "best": run.best,
                            "epoch": epoch, "signature": run.signature})


def _finish(run: _Run, out: Path, metrics: Path, train_time: float, train_size: int, group: Group) -> dict:
    """Write the best epoch's model and the metrics; only then drop other runs' best checkpoints."""
    cfg, tc = run.cfg, run.cfg.train
    best_model, best_ck = load_model(run.best_path)
    version = run.signature["code"]
    save_model(out, best_model, train=plain(tc), epoch=run.best["epoch"], validation=best_ck.get("validation", {}),
               experiment=cfg.name, code_version=version, settings=plain(cfg))
    summary = {"experiment": cfg.name, "epochs": run.history, "best_epoch": run.best["epoch"],
               "best_validation": run.best, "device": str(run.device), "torch": torch.__version__,
               "train_time_s": train_time, "bound": str(tc.bound), "loss": str(tc.loss),
               "masked_norms": str(tc.masked_norms) if str(tc.bound) == "local" else None,
               "params": sum(p.numel() for p in run.model.parameters()), "train_size": train_size,
               "code_version": version, "settings": plain(cfg), "processes": group.world}
    write_json(metrics, summary)
    keep_copy([out, metrics], last_good(out))
    for old in run.best_path.parent.glob("best*.pt"):
        if old != run.best_path:
            old.unlink(missing_ok=True)
    print(f"[train] {cfg.name}: best epoch {run.best['epoch']} (validation certified "
          f"{run.best['certified_acc']:.4f}, clean {run.best['clean_acc']:.4f}) -> {out}")
    return summary
