"""``evaluate``: clean and certified accuracy of a whole split, for model selection and calibration."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..bounds import global_bound
from .cascade import certify

Tensor = torch.Tensor


def evaluate(model: nn.Module, x: Tensor, y: Tensor, eps: float, bound: str, *, max_iter: int = 200,
             tol: float = 1e-4, batch_size: int = 256, seed: int = 0) -> Dict[str, float]:
    """Clean and certified accuracy of a split, for model selection and calibration.

    The local certificate is the cascade with the (cheaper) estimate level as its last
    step: it ranks candidates, it certifies nothing. Most points are decided by the global
    and box steps, which are exact.
    """
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate an empty split (0 examples)")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    g = global_bound(model, method="guaranteed", input_shape=tuple(x.shape[1:]))
    correct = certified = 0
    for s in range(0, x.shape[0], batch_size):
        xb, yb = x[s:s + batch_size].to(device), y[s:s + batch_size].to(device)
        c = certify(model, xb, yb, eps, bound, guarantee="estimate", max_iter=max_iter, tol=tol, generator=gen,
                    global_result=g)
        correct += int(c.correct.sum())
        certified += int(c.certified.sum())
    n = x.shape[0]
    return {"clean_acc": correct / n, "certified_acc": certified / n}
