"""Training with the local (Local-Lip) or global (GloRo) bound: schedules, the loss, one step.

Schedules follow the papers: optional clean warm-up, then eps ramps from 0 to eps_train
while kappa (weight of the clean loss in the BCP mix) goes from 1 to kappa_end; Adam with
a constant learning rate, then exponential decay. The loss is built on the bound the step
estimates (``training_local_bound``: warm-started Lanczos steps on the masked operators,
or, with ``masked_norms``, the global norms where the masks change nothing), and the
margins it gives (ball or ball ∩ box last layer); ``train_step`` takes one step.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .bounds import (NormSettings, clean_pass, converged_layer_norms, global_bound, global_margins, local_bound,
                     local_margins, network_layers)
from .foundation.schema import TrainConfig
from .losses import bcp_mix_loss, emma_loss, gloro_loss, gloro_trades_loss, sparsity_loss, trades_kl_loss
from .nn.activations import clamp_thresholds
from .nn.models import LipschitzNet

Tensor = torch.Tensor


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


def training_global_bound(model: LipschitzNet, tc: TrainConfig, update: bool = True):
    """The global norms the training step estimates (GloRo's bound; the local bound's warm start)."""
    steps = tc.solver_steps if tc.solver == "krylov" else tc.power_iters
    return global_bound(model, method=str(tc.solver), iters=steps, update=update)


def training_norm_settings(tc: TrainConfig) -> NormSettings:
    """How the training step estimates the masked norms: warm-started from the global singular vectors,
    ``solver_steps`` Lanczos steps (``solver=krylov``) or ``power_iters`` power iterations."""
    common = dict(level="estimate", init="global", work_dtype=None, masked_norms=str(tc.masked_norms),
                  adaptive_tol=tc.adaptive_tol)
    if tc.solver == "krylov":
        return NormSettings(steps=tc.solver_steps, method="krylov", **common)
    return NormSettings(max_iter=tc.power_iters, tol=0.0, method="power", **common)


def training_local_bound(model: LipschitzNet, x: Tensor, eps: float, tc: TrainConfig):
    """The local bound the training step optimises (``training_norm_settings``)."""
    return local_bound(model, x, eps, training_norm_settings(tc))


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
        training_global_bound(model, tc)  # the warm start as a training step refreshes it
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


def margin_anchor(logits: Tensor, y: Tensor, tc: TrainConfig) -> Tensor:
    """The class the margins are taken from: the label, or the prediction for the GloRo reference's TRADES
    (its ⊥ logit is at the predicted class)."""
    return logits.argmax(1).detach() if tc.loss == "trades_kl" else y


def robust_loss(model: LipschitzNet, x: Tensor, y: Tensor, eps: float, kappa: float, tc: TrainConfig
                ) -> Tuple[Tensor, Dict[str, object]]:
    """Training loss at radius eps with the configured bound and loss."""
    if eps <= 0 and kappa >= 1 and tc.loss == "bcp_mix":
        return F.cross_entropy(model(x), y), {}
    stats: Dict[str, object] = {}
    extra: Tensor | float = 0.0
    if tc.bound == "local":
        with torch.no_grad():  # keep the global singular vectors (the local warm start) fresh
            training_global_bound(model, tc)
        lb = training_local_bound(model, x, eps, tc)
        logits = lb.logits
        margins = local_margins(model, lb, margin_anchor(logits, y, tc), tc.last_layer)
        stats["fixed_fraction"] = lb.fixed_fraction()
        stats["fixed_per_layer"] = lb.fixed_fraction_per_layer()
        stats["masked_per_layer"] = list(lb.record.masked_fraction or [])
        if tc.sparsity_weight > 0:
            _, acts = network_layers(model)
            extra = tc.sparsity_weight * sparsity_loss(lb.pre_bounds, acts)
    else:
        g = training_global_bound(model, tc)
        clean = clean_pass(model, x)
        logits = clean.logits
        margins = global_margins(model, logits, clean.features, margin_anchor(logits, y, tc), g.lipschitz, eps)
    if tc.loss == "bcp_mix":
        loss = bcp_mix_loss(logits, margins, y, kappa)
    elif tc.loss == "gloro":
        loss = gloro_loss(logits, margins, y)
    elif tc.loss == "emma":
        loss = emma_loss(logits, margins, y)
    elif tc.loss == "trades_kl":
        loss = trades_kl_loss(logits, margins, y, tc.trades_lambda)
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
