"""The clean forward pass every bound starts from, and the check of what it is given.

One clean pass per batch: the pre-activations, the penultimate features and the logits, as
the bounds compute them (``clean_pass``). The local bound, the cascade's steps at every
radius, the radius search and the training step all reuse it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from .layers import network_layers

Tensor = torch.Tensor


@dataclass
class CleanPass:
    """The clean forward pass of a batch: what every bound at every radius starts from."""

    pre: List[Tensor]  # hidden pre-activations z_l
    features: Tensor  # [B, d] penultimate features h_{L-1} (flattened)
    logits: Tensor  # [B, C]

    def select(self, idx: Tensor) -> "CleanPass":
        return CleanPass([z[idx] for z in self.pre], self.features[idx], self.logits[idx])


def clean_pass(model: nn.Sequential, x: Tensor) -> CleanPass:
    """Pre-activations, penultimate features and logits of x, as the bounds compute them."""
    ops, acts = network_layers(model, input_shape=tuple(x.shape[1:]))
    h, pre = x, []
    for op, act in zip(ops[:-1], acts):
        z = op.forward(h)
        pre.append(z)
        h = act(z)
    return CleanPass(pre, h.flatten(1), ops[-1].forward(h))



def check_input(model: nn.Module, x: Tensor) -> None:
    """x must be a non-empty batch [B, *input_shape] of a float dtype the bounds are sound in, and the
    model a plain Sequential."""
    if not isinstance(model, nn.Sequential):
        inner = getattr(model, "module", None)
        hint = " (a DataParallel or DistributedDataParallel wrapper: pass model.module)" if inner is not None else ""
        raise ValueError(f"the bounds need a plain nn.Sequential of supported layers, got {type(model).__name__}{hint}")
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a batch of inputs [B, ...], got shape {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (0 samples)")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x has dtype {x.dtype}: the bounds and their rounding margins assume float32 or "
                         f"float64, so reduced precision is refused (convert the model and x with .double())")
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    if dtypes and dtypes != [str(x.dtype)]:
        raise ValueError(f"the model's parameters are {', '.join(dtypes)} but x is {x.dtype}: bound and certify in "
                         f"one dtype, float32 or float64 (float64 recommended: model.double(), x.double())")
    declared = getattr(model, "input_shape", None)
    if declared is not None and tuple(declared) != tuple(x.shape[1:]):
        raise ValueError(f"input of shape {tuple(x.shape)} does not match the model's input {tuple(declared)}")


def check_finite_weights(model: nn.Module) -> None:
    """No certificate holds for NaN or inf weights (certification checks; training reports divergence itself)."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"weight {name} holds NaN or inf: no bound holds for it")
