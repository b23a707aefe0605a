"""Residual blocks as LiResNet uses them (Hu et al., NeurIPS 2023): ``y = x + conv(x)``.

LiResNet's block (``LiResConv`` in hukkai/liresnet) is ``act(x + W x + b)`` with W a 3x3,
stride-1, zero-padded convolution from ``width`` to ``width`` channels, whose Lipschitz bound is
the norm of the single operator ``I + W``. Here the affine part is one module and the activation
follows it as its own module (as after every other affine layer), so the bounds see one affine
operator ``I + W`` and one activation. LiResNet's reparametrisation of W (a per-channel gain and a
``depth ** -0.5`` scale) only changes how W is trained; here the scale is applied at
initialisation. Its training-time batch centring is left out: it is not a fixed affine map.
"""
from __future__ import annotations

import torch
from torch import nn


class ResidualConv2d(nn.Module):
    """``y = x + conv(x)``: a ``channels``-to-``channels`` zero-padded, stride-1 convolution plus
    its input (odd kernel, 'same' padding, so the output has the input's shape)."""

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True, init_scale: float = 1.0):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ResidualConv2d needs an odd kernel_size (same padding), got {kernel_size}")
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride=1, padding=kernel_size // 2, bias=bias)
        if init_scale != 1.0:
            with torch.no_grad():
                self.conv.weight.mul_(init_scale)

    @property
    def channels(self) -> int:
        return self.conv.in_channels

    @property
    def kernel_size(self) -> int:
        return self.conv.kernel_size[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"
