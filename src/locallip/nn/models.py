"""Architectures: plain ``nn.Sequential`` stacks of Conv2d / Linear / Flatten / activations
(and residual blocks, ``nn.blocks``).

Names follow the Local-Lip and GloRo papers: ``nCmF`` is n convolutions then m
dense layers (the last dense layer gives the logits); ``liresnet`` is LiResNet's layout (a stem
convolution, residual blocks, a strided neck convolution, dense layers). Inputs are images in
[0, 1]; an optional ``Normalize`` first module is folded into the first layer by
the bounds, so a radius always means l2 distance in [0, 1] pixel units.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .activations import LipschitzActivation, make_activation
from .blocks import ResidualConv2d
from ..foundation.catalog import ARCHITECTURES, RESIDUAL_ARCHITECTURES

class Normalize(nn.Module):
    """(x - mean) / std per channel. Treated by the bounds as part of the first layer."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError("Normalize needs mean and std of equal length with std > 0")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


#: Modules without weights that the bounds join with the affine layer next to them into one
#: operator (``bounds/layers/composed.py``): such a pair gets one warm-start vector.
JOINS_NEIGHBOURS = (nn.AvgPool2d,)


def pooling_problem(m: nn.AvgPool2d) -> Optional[str]:
    """Why the bounds cannot take this AvgPool2d (None: they can)."""
    if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
        return (f"AvgPool2d with ceil_mode={m.ceil_mode}, count_include_pad={m.count_include_pad}, "
                f"divisor_override={m.divisor_override}: only the defaults (False, True, None) are supported")
    return None


class LipschitzNet(nn.Sequential):
    """A Sequential that also records its input shape, class count and build spec."""

    def __init__(self, *modules: nn.Module, input_shape: Sequence[int], num_classes: int,
                 spec: Optional[dict] = None):
        super().__init__(*modules)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.spec = dict(spec or {})
        # Right-singular-vector estimates of every affine layer (a layer the bounds see as one
        # operator: Conv2d, Linear, a residual block, ...), warm-started across training steps by
        # the global bound's power iteration. Buffers: saved in checkpoints, no gradient.
        gen = torch.Generator().manual_seed(0)
        first = next(self.parameters(), None)  # the shape pass runs in the layers' own dtype
        h = torch.zeros(1, *self.input_shape, dtype=torch.float32 if first is None else first.dtype)
        index, previous = 0, None  # previous: the affine module just before (only Flatten since)
        modes = [(m, m.training) for m in self.modules()]
        self.eval()  # the shape pass changes nothing (a BatchNorm's running statistics) and takes a batch of 1
        with torch.no_grad():
            for m in self:
                if is_affine_module(m):
                    # A pooling layer and its affine neighbour are one operator for the bounds: one vector.
                    joined = previous is not None and (isinstance(previous, JOINS_NEIGHBOURS)
                                                       or isinstance(m, JOINS_NEIGHBOURS))
                    if not joined:
                        v = torch.randn(h[0].numel(), generator=gen)
                        self.register_buffer(f"power_vector_{index}", v / v.norm())
                        index += 1
                    previous = m
                elif not isinstance(m, nn.Flatten):
                    previous = None
                h = m(h)
        for m, training in modes:
            m.training = training

    def power_vectors(self) -> List[torch.Tensor]:
        """Warm-start vectors of the layers, in order (flattened layer inputs)."""
        return [getattr(self, f"power_vector_{i}") for i in range(len(self.affine_layers()))
                if hasattr(self, f"power_vector_{i}")]

    def affine_layers(self) -> List[nn.Module]:
        return [m for m in self if is_affine_module(m)]


def is_affine_module(m: nn.Module) -> bool:
    """Whether the bounds see a top-level module as an affine operator: everything in a network but
    its activations and the shape-only modules (``Flatten``, a leading ``Normalize``, which the bounds
    fold into the next layer). ``bounds.layers`` registers how each such module is bounded."""
    return not isinstance(m, (LipschitzActivation, nn.ReLU, nn.Flatten, Normalize))


def build_model(arch: str, activation: str = "clipped_relu", input_shape: Sequence[int] = (1, 28, 28),
                num_classes: int = 10, theta_init: float = 1.0,
                mean: Sequence[float] = (), std: Sequence[float] = (), *,
                depth: Optional[int] = None, width: Optional[int] = None) -> LipschitzNet:
    """Build one of ARCHITECTURES or RESIDUAL_ARCHITECTURES with the given activation (``depth`` and
    ``width``: a residual architecture's number of blocks and their channels; None: the catalog's)."""
    arch, activation = str(arch), str(activation)  # names (a string-valued enum is accepted too)
    if arch not in ARCHITECTURES and arch not in RESIDUAL_ARCHITECTURES:
        known = list(ARCHITECTURES) + list(RESIDUAL_ARCHITECTURES)
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(known)}")
    if arch in ARCHITECTURES and (depth is not None or width is not None):
        raise ValueError(f"model.depth and model.width apply to residual architectures "
                         f"({', '.join(RESIDUAL_ARCHITECTURES)}), not {arch}")
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {input_shape}")
    modules: List[nn.Module] = []
    if len(mean):
        if len(mean) != input_shape[0]:
            raise ValueError(f"normalization has {len(mean)} channels, input has {input_shape[0]}")
        modules.append(Normalize(mean, std))
    spec = dict(arch=arch, activation=activation, input_shape=list(input_shape), num_classes=int(num_classes),
                theta_init=float(theta_init), mean=[float(m) for m in mean], std=[float(s) for s in std])
    if arch in ARCHITECTURES:
        convs, denses = ARCHITECTURES[arch]
        shape = _conv_stack(modules, convs, input_shape, activation, theta_init, arch)
    else:
        res = RESIDUAL_ARCHITECTURES[arch]
        depth, width = int(res["depth"] if depth is None else depth), int(res["width"] if width is None else width)
        spec.update(depth=depth, width=width)
        shape = _conv_stack(modules, [(width, *res["stem"])], input_shape, activation, theta_init, arch)
        for _ in range(depth):
            # LiResNet scales its blocks' residual branches by depth ** -0.5 (here: at initialisation).
            modules.append(ResidualConv2d(width, res["kernel"], init_scale=depth ** -0.5))
            modules.append(make_activation(activation, shape, theta_init))
        shape = _conv_stack(modules, [res["neck"]], shape, activation, theta_init, arch)
        denses = res["dense"]
    modules.append(nn.Flatten())
    features = math.prod(shape)
    for w in denses:
        modules.append(nn.Linear(features, w))
        modules.append(make_activation(activation, (w,), theta_init))
        features = w
    modules.append(nn.Linear(features, num_classes))
    return LipschitzNet(*modules, input_shape=input_shape, num_classes=num_classes, spec=spec)


def _conv_stack(modules: List[nn.Module], convs, shape: Tuple[int, int, int], activation: str, theta_init: float,
                arch: str) -> Tuple[int, int, int]:
    """Append each (out_channels, kernel, stride, padding) convolution and its activation; the output shape."""
    c, h, w = shape
    for out_c, k, s, p in convs:
        modules.append(nn.Conv2d(c, out_c, k, stride=s, padding=p))
        c, h, w = out_c, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        if h < 1 or w < 1:
            raise ValueError(f"input {tuple(shape)} is too small for {arch}")
        modules.append(make_activation(activation, (c, h, w), theta_init))
    return c, h, w


def model_from_spec(spec: dict) -> LipschitzNet:
    """Rebuild an (untrained) model from ``model.spec``; load a state_dict into it afterwards."""
    required = ("arch", "activation", "input_shape", "num_classes")
    missing = [k for k in required if k not in spec]
    if missing:
        raise ValueError(f"model spec lacks {', '.join(missing)}")
    return build_model(spec["arch"], spec["activation"], spec["input_shape"], spec["num_classes"],
                       spec.get("theta_init", 1.0), spec.get("mean", ()), spec.get("std", ()),
                       depth=spec.get("depth"), width=spec.get("width"))
