"""BatchNorm folded into the layer before it: the network the bounds certify, computed exactly."""
from __future__ import annotations

import copy
from typing import List

import torch
from torch import nn

from .models import LipschitzNet

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """A copy of ``model`` with every BatchNorm folded into the Conv2d or Linear right before it.

    In eval mode (the mode the bounds certify in: ``certify`` switches to it) a BatchNorm is the
    per-channel affine map ``y = gamma (z - mu) / sqrt(var + eps) + beta`` with its running mean mu
    and variance var (gamma = 1, beta = 0 without ``affine``). Applied to ``z = W h + b`` it gives,
    with ``s = gamma / sqrt(var + eps)`` per output channel (per output feature for Linear),

        W' = diag(s) W,        b' = s (b - mu) + beta

    (for a convolution, row c of the kernel, W[c, :, :, :], is scaled by s_c). The fold is computed in
    float64 and rounded once to the layer's dtype, so the folded network equals the original up to
    that rounding; the certificates are about the folded weights. ``model`` is not changed. A
    BatchNorm not directly after a Conv2d or Linear, or without running statistics, is refused with
    a ``ValueError`` naming its index.
    """
    modules: List[nn.Module] = []
    folded = []
    for i, m in enumerate(model):
        if not isinstance(m, _BATCH_NORMS):
            modules.append(copy.deepcopy(m))
            continue
        what = f"layer {i} ({type(m).__name__})"
        before = modules[-1] if modules else None
        layer_type = nn.Conv2d if isinstance(m, nn.BatchNorm2d) else nn.Linear
        if not isinstance(before, layer_type) or isinstance(model[i - 1], _BATCH_NORMS):
            raise ValueError(f"{what} does not directly follow a {layer_type.__name__} layer: only such a "
                             f"BatchNorm can be folded")
        if m.running_mean is None or m.running_var is None:
            raise ValueError(f"{what} has no running statistics (track_running_stats=False): it normalises "
                             f"with each batch's own, so it is no fixed map to certify")
        if m.num_features != before.weight.shape[0]:
            raise ValueError(f"{what} has {m.num_features} features, the layer before it {before.weight.shape[0]} "
                             f"outputs")
        modules[-1] = _folded(before, m, what)
        folded.append(i)
    return _like(model, modules, folded)


def _folded(layer: nn.Module, bn: nn.Module, what: str) -> nn.Module:
    """The copy ``layer`` (already a deep copy) with ``bn`` folded into its weight and bias."""
    var = bn.running_var.detach().double()
    if not bool(torch.all(var + bn.eps > 0)):
        raise ValueError(f"{what} has running_var + eps <= 0: no valid normalisation to fold")
    scale = torch.rsqrt(var + bn.eps)
    shift = -bn.running_mean.detach().double() * scale
    if bn.affine:
        gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
        scale, shift = scale * gamma, shift * gamma + beta
    weight = layer.weight.detach().double()
    bias = torch.zeros_like(scale) if layer.bias is None else layer.bias.detach().double()
    dtype, device = layer.weight.dtype, layer.weight.device
    with torch.no_grad():
        layer.weight.copy_((weight * scale.view(-1, *([1] * (weight.dim() - 1)))).to(dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.empty(weight.shape[0], dtype=dtype, device=device))
        layer.bias.copy_((bias * scale + shift).to(dtype))
    return layer


def _like(model: nn.Sequential, modules: List[nn.Module], folded: List[int]) -> nn.Sequential:
    """A Sequential of ``modules`` with ``model``'s own attributes (a ``LipschitzNet``'s input shape,
    classes and spec, recording which layers were folded)."""
    if isinstance(model, LipschitzNet):
        spec = dict(model.spec, batchnorm_folded=folded) if folded else dict(model.spec)
        out = LipschitzNet(*modules, input_shape=model.input_shape, num_classes=model.num_classes, spec=spec)
    else:
        out = nn.Sequential(*modules)
        if hasattr(model, "input_shape"):
            out.input_shape = model.input_shape
    return out.train(model.training)
