"""Lower bounds of the logit margins z_y - z_j over the ball, and the logits built from them."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .clean import clean_pass
from .layers import affine_layer, is_affine, network_layers
from .localbound import LocalBound
from .settings import as_batch_radius

Tensor = torch.Tensor


def logit_weights(model: nn.Sequential):
    """(W [C, d], b [C]) of the layer giving the logits from the flattened penultimate features."""
    modules = [m for m in model if not isinstance(m, nn.Flatten)]
    if len(modules) > 1 and is_affine(modules[-2]):  # the last layer is composed (pooling, then Linear)
        shape = getattr(model, "input_shape", None)
        if not shape:
            raise ValueError("a pooling layer before the logits needs the model's input_shape attribute")
        op = network_layers(model, input_shape=shape)[0][-1]
        if not op.gives_logits:
            raise ValueError("the model must end with a Linear layer giving the logits")
        return op.logit_weights()
    layers = [m for m in model if is_affine(m)]
    weight = getattr(layers[-1], "weight", None) if layers else None
    if weight is None or weight.dim() != 2:
        raise ValueError("the model must end with a Linear layer giving the logits")
    op = affine_layer(layers[-1], (weight.shape[1],))
    if not op.gives_logits:
        raise ValueError("the model must end with a Linear layer giving the logits")
    return op.logit_weights()


def margin_lower_bounds(weight: Tensor, bias: Optional[Tensor], features: Tensor, radius: Tensor,
                        y: Tensor, *, feature_mask: Optional[Tensor] = None,
                        lower: Optional[Tensor] = None, upper: Optional[Tensor] = None,
                        mode: str = "ball", bisection_steps: int = 30) -> Tensor:
    """Lower bounds of the margins z_y - z_j over the reachable penultimate features.

    The features lie in the ball ||h - features|| <= radius (only coordinates
    where ``feature_mask`` is 1 move) and, for mode="ball_box", also in the box
    [lower, upper] (BCP, Lee et al. 2020). Returns [B, C] with 0 in column y.

    ball:     c.h - radius * ||mask * c||,  c = w_y - w_j.
    ball_box: the best of the ball bound, the box bound, and the Lagrangian dual
              g(t) = min_{h in box} c.h + ||h - h0||^2/(2t) - radius^2/(2t),
              which by weak duality is a valid lower bound for *every* t > 0; t is
              chosen by bisection so that the minimiser sits on the sphere.
    """
    if mode not in ("ball", "ball_box"):
        raise ValueError(f"unknown last-layer mode {mode!r}")
    w_y = weight[y]  # [B, d]
    c = w_y[:, None, :] - weight[None, :, :]  # [B, C, d]
    db = 0 if bias is None else bias[y][:, None] - bias[None, :]
    h0 = features[:, None, :]
    clean = (c * h0).sum(-1) + db
    cm = c if feature_mask is None else c * feature_mask[:, None, :]
    cnorm = cm.norm(dim=-1)
    r = radius[:, None]
    best = clean - r * cnorm
    if mode == "ball_box":
        if lower is None or upper is None:
            raise ValueError("ball_box needs the feature box (lower, upper)")
        lo, hi = lower[:, None, :], upper[:, None, :]
        box = torch.minimum(c * lo, c * hi).sum(-1) + db
        best = torch.maximum(best, box)
        with torch.no_grad():
            # Bisection in log t for ||clip(h0 - t c, lo, hi) - h0|| = r (nondecreasing in t).
            positive = (r > 0) & (cnorm > 0)
            t_lo = torch.where(positive, r / cnorm.clamp_min(1e-30), torch.ones_like(cnorm))
            t_hi = t_lo * 1e6
            def reach(t):
                return (torch.clamp(h0 - t[..., None] * c, lo, hi) - h0).square().sum(-1)
            r2 = r.square()
            for _ in range(bisection_steps):
                mid = t_lo * (t_hi / t_lo).sqrt()  # geometric mean without squaring (underflow at tiny radii)
                inside = reach(mid) <= r2
                t_lo = torch.where(inside, mid, t_lo)
                t_hi = torch.where(inside, t_hi, mid)
        for t in (t_lo, t_hi):
            t = t.detach()
            hm = torch.clamp(h0 - t[..., None] * c, lo, hi)
            g = (c * hm).sum(-1) + ((hm - h0).square().sum(-1) - r.square()) / (2 * t) + db
            # g is a valid bound wherever it is finite; rounding at extreme scales can make it NaN.
            best = torch.where(positive & torch.isfinite(g), torch.maximum(best, g), best)
    onehot = F.one_hot(y, weight.shape[0]).bool()
    return best.masked_fill(onehot, 0.0)


def local_margins(model: nn.Sequential, lb: LocalBound, y: Tensor, mode: str = "ball_box") -> Tensor:
    """Margin lower bounds [B, C] for labels y from a ``LocalBound``."""
    weight, bias = logit_weights(model)
    return margin_lower_bounds(weight, bias, lb.features, lb.feature_radius, y,
                               feature_mask=lb.feature_mask, lower=lb.feature_lower, upper=lb.feature_upper,
                               mode=mode)


def global_margins(model: nn.Sequential, logits: Tensor, features: Tensor, y: Tensor,
                   lipschitz: Tensor, eps: Union[float, Tensor]) -> Tensor:
    """GloRo margins z_y - z_j - eps K ||w_y - w_j|| [B, C] (0 in column y)."""
    weight, bias = logit_weights(model)
    eps_b = as_batch_radius(eps, features)
    return margin_lower_bounds(weight, bias, features, eps_b * lipschitz, y, mode="ball")


def worst_case_logits(logits: Tensor, margins: Tensor, y: Tensor) -> Tensor:
    """Logits with every other class at its worst case: z~_j = z_y - m_j, z~_y = z_y."""
    z_y = logits.gather(1, y[:, None])
    return z_y - margins


def bottom_logit(logits: Tensor, margins: Tensor, y: Tensor) -> Tensor:
    """GloRo's ⊥ logit max_{j != y} (z_y - m_j), appended as class C: [B, C+1]."""
    z_y = logits.gather(1, y[:, None])
    other = (z_y - margins).masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return torch.cat([logits, other.max(dim=1, keepdim=True).values], dim=1)


def worst_margin(margins: Tensor, y: Tensor) -> Tensor:
    """min_{j != y} m_j per sample."""
    return margins.masked_fill(F.one_hot(y, margins.shape[1]).bool(), float("inf")).min(dim=1).values


def penultimate(model: nn.Sequential, x: Tensor) -> Tensor:
    """Clean penultimate features h_{L-1} (flattened) of x (``clean_pass``'s)."""
    return clean_pass(model, x).features
