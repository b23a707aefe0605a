"""Where the local bound pays on one model: its gain over the global certificate, and how many
neurons its masks fix.

``local_gain`` certifies a split at one radius with the project's certification
(``certify.split.certify_split``: the local cascade and, beside it, the same model's global
certificate) and measures the share of neurons whose activation is constant on the l2 ball of
that radius around each point:

* ``fixed_per_layer``: the masks of the local bound at the certificate's level, computed for
  every point (the masks the cascade's masked step forms; ``bounds.local_bound``);
* ``fixed_box_per_layer``: the masks of the box step (``bounds.box_bound``: the same boxes built
  on the guaranteed global layer norms, so never more fixed neurons than the line above).

Both are sound: a neuron they call fixed is constant on the whole ball (with probability
>= 1 - delta for the probabilistic level). The gain's standard error is the paired one: per
point, certified locally minus certified globally (0 or 1, as every local certificate starts
with the global step).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

from ..bounds import box_bound, local_bound
from .split import batches, certify_split, level_settings, prepare

Tensor = torch.Tensor

__all__ = ["fixed_share", "local_gain", "paired_gain"]


def _layer_means(per_batch: List[List[float]], sizes: List[int]) -> List[float]:
    """Per layer, the mean over the points of the batches' shares (each batch weighted by its size)."""
    n = sum(sizes)
    return [sum(share[l] * size for share, size in zip(per_batch, sizes)) / n for l in range(len(per_batch[0]))]


def _weighted(shares: List[float], neurons: List[int]) -> Optional[float]:
    """The share of all hidden neurons (each layer weighted by its neurons)."""
    total = sum(neurons)
    return sum(s * k for s, k in zip(shares, neurons)) / total if total else None


def fixed_share(model: nn.Module, x: Tensor, radius: float, settings) -> Dict[str, object]:
    """Share of the neurons of every activation layer that are constant on B(x_i, radius), mean over
    the points, from the local bound's masks at ``settings.guarantee`` and from the box step's.

    ``settings``: the certify settings (``foundation.schema.CertifySettings``); batches and their
    random starts follow ``certify_split`` (batch size, seed, dtype).
    """
    model, g, device, dtype = prepare(model, x, settings)
    norms = level_settings(settings, str(settings.guarantee)).norms(init="random")
    local, box, sizes = [], [], []
    neurons: List[int] = []
    for start, gen in batches(x.shape[0], settings.batch_size, settings.seed):
        xb = x[start:start + settings.batch_size].to(device=device, dtype=dtype)
        with torch.no_grad():
            lb = local_bound(model, xb, float(radius), norms, generator=gen, global_norms=g.layer_norms)
            bb = box_bound(model, xb, float(radius), global_norms=g.layer_norms)
        local.append(lb.fixed_fraction_per_layer())
        box.append(bb.fixed_fraction_per_layer())
        sizes.append(int(xb.shape[0]))
        neurons = [int(m[0].numel()) for m in lb.masks]
    per_layer, box_layer = _layer_means(local, sizes), _layer_means(box, sizes)
    return {"neurons_per_layer": neurons, "fixed_per_layer": per_layer,
            "fixed_mean": sum(per_layer) / len(per_layer) if per_layer else None,
            "fixed_weighted": _weighted(per_layer, neurons),
            "fixed_box_per_layer": box_layer, "fixed_box_weighted": _weighted(box_layer, neurons),
            "level": str(settings.guarantee)}


def paired_gain(rows: List[dict]) -> Dict[str, Optional[float]]:
    """Mean and standard error (None for one point) of (certified locally - certified globally) over the
    points' rows."""
    d = [int(r["certified_local"]) - int(r["certified_global"]) for r in rows]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n) if n > 1 else None
    return {"gain": mean, "gain_se": se}


def local_gain(model: nn.Module, x: Tensor, y: Tensor, radius: float, settings, *, audit: bool = False,
               progress: bool = False) -> Dict[str, object]:
    """At ``radius``: the fixed share per layer (``fixed_share``), certified accuracy of the local and the
    global certificate on the same points (``certify_split``), and their difference with its standard
    error (fractions; ``gain_points`` in percentage points; ``gain_of_open``: the difference over the
    correct points the global certificate leaves open). ``audit``: the attack audits every
    certified point (``attack_broken`` counts what it broke; 0 expected)."""
    result = certify_split(model, x, y, float(radius), settings, progress=progress, audit=audit)
    s = result["summary"]
    out: Dict[str, object] = {"radius": float(radius), "n": s["n"], "clean": s["clean_acc"],
                              "certified_local": s["certified_acc_local"],
                              "certified_global": s["certified_acc_global"]}
    out.update(paired_gain(result["rows"]))
    out["gain_points"] = 100 * out["gain"]
    # of the correct points the global certificate leaves open, the share the local one certifies: the
    # gain without the ceiling that the global certificate's own success puts on it
    left_open = s["clean_acc"] - s["certified_acc_global"]
    out["gain_of_open"] = out["gain"] / left_open if left_open > 0 else None
    out["gain_se_points"] = None if out["gain_se"] is None else 100 * out["gain_se"]
    out["steps"] = {k: v for k, v in s["steps"]["certified_by_step"].items() if v}
    out["attack_checked"] = s["attack"]["checked"] if audit else None
    out["attack_broken"] = s["attack"]["broken"] if audit else None
    out.update(fixed_share(model, x, radius, settings))
    return out
