"""Layers as linear operators, the split of a Sequential into them, and their masked forms.

Notation: h_0 = x, z_l = W_l h_{l-1} + b_l, h_l = act_l(z_l) for l < L, logits z_L.
A masked operator is A = diag(row_mask) W diag(col_mask): W with the rows of fixed
outputs and the columns of fixed inputs removed (0/1 masks, per sample).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.activations import LipschitzActivation
from ..nn.models import Normalize

Tensor = torch.Tensor


class AffineOp:
    """One Conv2d/Linear layer as an operator on per-sample tensors of ``in_shape``.

    A preceding ``Normalize`` is folded in (its 1/std scales the input columns;
    its shift only moves the bias), and a preceding ``Flatten`` is applied inside.
    """

    def __init__(self, layer: nn.Module, in_shape: Sequence[int], norm: Optional[Normalize] = None,
                 flatten: bool = False):
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"unsupported layer {type(layer).__name__}")
        self.layer = layer
        self.in_shape = tuple(in_shape)
        self.norm = norm
        self.flatten = flatten
        self._weight: Optional[Tensor] = None  # set by cast(): the same operator in another dtype
        self._std: Optional[Tensor] = None
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros":
                raise ValueError("only plain zero-padded Conv2d (groups=1, dilation=1) is supported")
            if flatten:
                raise ValueError("Flatten before Conv2d is not supported")
            if len(self.in_shape) != 3:
                raise ValueError(f"Conv2d needs inputs of shape (channels, height, width) per sample, got "
                                 f"{self.in_shape}: pass x as a batch [B, C, H, W]")
            if self.in_shape[0] != layer.in_channels:
                raise ValueError(f"Conv2d expects {layer.in_channels} input channels, gets inputs of shape "
                                 f"{self.in_shape}")
            c, h, w = self.in_shape
            kh, kw = layer.kernel_size
            (sh, sw), (ph, pw) = layer.stride, layer.padding
            oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
            self.out_shape = (layer.out_channels, oh, ow)
            self.output_padding = (h - ((oh - 1) * sh - 2 * ph + kh), w - ((ow - 1) * sw - 2 * pw + kw))
        else:
            n = 1
            for s in self.in_shape:
                n *= s
            if n != layer.in_features:
                raise ValueError(f"Linear expects {layer.in_features} inputs, gets {self.in_shape}")
            self.out_shape = (layer.out_features,)

    @property
    def weight(self) -> Tensor:
        return self.layer.weight if self._weight is None else self._weight

    def cast(self, dtype: torch.dtype) -> "AffineOp":
        """The same linear operator with detached weights in ``dtype`` (for cheap power iterations)."""
        op = AffineOp.__new__(AffineOp)
        op.__dict__.update(self.__dict__)
        op._weight = self.layer.weight.detach().to(dtype)
        op._std = None if self.norm is None else self.norm.std.to(dtype)
        return op

    def _scale(self, v: Tensor, power: int = 1) -> Tensor:
        if self.norm is None:
            return v
        std = self.norm.std if self._std is None else self._std
        return v / std ** power

    def _apply(self, v: Tensor, weight: Tensor) -> Tensor:
        if isinstance(self.layer, nn.Conv2d):
            return F.conv2d(v, weight, None, self.layer.stride, self.layer.padding)
        return F.linear(v.flatten(1), weight)

    def forward(self, h: Tensor) -> Tensor:
        """z = W h + b, exactly as the model computes it."""
        if self.norm is not None:
            h = self.norm(h)
        if self.flatten:
            h = h.flatten(1)
        return self.layer(h)

    def linear(self, v: Tensor) -> Tensor:
        """W v (no bias)."""
        return self._apply(self._scale(v), self.weight)

    def transpose(self, u: Tensor) -> Tensor:
        """W^T u, shaped like the layer input."""
        if isinstance(self.layer, nn.Conv2d) and self.layer.in_channels == 1:
            # One input channel: the transpose is a small matmul and a fold (col2im), ~2x faster
            # on CPU than conv_transpose2d, which is slow for this shape.
            k = self.layer.kernel_size
            cols = torch.matmul(self.weight.reshape(self.weight.shape[0], -1).T, u.flatten(2))
            v = F.fold(cols, self.in_shape[1:], k, padding=self.layer.padding, stride=self.layer.stride)
        elif isinstance(self.layer, nn.Conv2d):
            v = F.conv_transpose2d(u, self.weight, None, self.layer.stride, self.layer.padding,
                                   self.output_padding)
        else:
            v = (u @ self.weight).view(u.shape[0], *self.in_shape)
        return self._scale(v)

    def abs_linear(self, v: Tensor) -> Tensor:
        """|W| v, for interval radii."""
        return self._apply(self._scale(v), self.weight.abs())

    def row_norms(self, col_mask: Optional[Tensor] = None) -> Tensor:
        """||row_k(W diag(col_mask))||_2 for every output neuron k (exact at padded borders)."""
        if col_mask is None:
            col_mask = torch.ones((1,) + self.in_shape, dtype=self.weight.dtype, device=self.weight.device)
        sq = self._apply(self._scale(col_mask, power=2), self.weight.square())
        # Clamping away from 0 only enlarges the norm (sound) and keeps sqrt differentiable.
        return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, (LipschitzActivation, nn.ReLU))


def network_layers(model: nn.Sequential, input_shape: Optional[Sequence[int]] = None
                   ) -> Tuple[List[AffineOp], List[nn.Module]]:
    """Split a Sequential into affine operators and the activations between them.

    Returns ``(ops, acts)`` with ``len(acts) == len(ops) - 1``: act l follows op l,
    and the last op gives the logits.
    """
    shape = tuple(input_shape or getattr(model, "input_shape", ()))
    if not shape:
        raise ValueError("the input shape is unknown: pass input_shape=(C, H, W) (or (features,)), "
                         "or give the model an input_shape attribute")
    ops: List[AffineOp] = []
    acts: List[nn.Module] = []
    norm, flatten, expect_op = None, False, True
    for m in model:
        if isinstance(m, Normalize):
            if ops or norm is not None:
                raise ValueError("Normalize is only supported as the first module")
            norm = m
        elif isinstance(m, nn.Flatten):
            flatten = True
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            if not expect_op:
                raise ValueError("two affine layers in a row: put an activation between them")
            op = AffineOp(m, shape, norm, flatten)
            ops.append(op)
            shape = op.out_shape
            norm, flatten, expect_op = None, False, False
        elif _is_activation(m):
            if expect_op:
                raise ValueError(f"activation {type(m).__name__} must follow an affine layer")
            acts.append(m)
            expect_op = True
        else:
            raise ValueError(f"unsupported module {type(m).__name__}: the bounds handle Conv2d, Linear, "
                             f"Flatten, Normalize (first) and locallip activations")
    if not ops or expect_op or not isinstance(ops[-1].layer, nn.Linear):
        raise ValueError("the model must end with a Linear layer giving the logits")
    return ops, acts


def _act_interval(act: nn.Module, lb: Tensor, ub: Tensor) -> Tuple[Tensor, Tensor]:
    return (torch.relu(lb), torch.relu(ub)) if isinstance(act, nn.ReLU) else act.interval(lb, ub)


def _act_masks(act: nn.Module, lb: Tensor, ub: Tensor) -> Tuple[Tensor, Tensor]:
    if isinstance(act, nn.ReLU):
        v = (ub > 0).to(lb.dtype)
        return v, v
    return act.masks(lb, ub)


def _batch_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1)


def _normalize(v: Tensor) -> Tensor:
    n = _batch_norm(v)
    # No epsilon added to the norm: a zero vector stays zero instead of shrinking others.
    return v / torch.where(n > 0, n, torch.ones_like(n)).view(-1, *([1] * (v.dim() - 1)))


def _in_dtype(dtype: Optional[torch.dtype], op: AffineOp, v0: Tensor, col_mask: Optional[Tensor],
              row_mask: Optional[Tensor]):
    """The operator, start vector and masks in ``dtype`` (unchanged when None or already so)."""
    if dtype is None or dtype == op.weight.dtype:
        return op, v0, col_mask, row_mask
    return (op.cast(dtype), v0.to(dtype), None if col_mask is None else col_mask.to(dtype),
            None if row_mask is None else row_mask.to(dtype))


def _masked_linear(op: AffineOp, v: Tensor, col_mask: Optional[Tensor], row_mask: Optional[Tensor]) -> Tensor:
    """A v with A = diag(row_mask) W diag(col_mask) (None = all ones)."""
    out = op.linear(v if col_mask is None else v * col_mask)
    return out if row_mask is None else out * row_mask


def _masked_transpose(op: AffineOp, u: Tensor, col_mask: Optional[Tensor]) -> Tensor:
    """A^T u for u = A v (already zero outside the row mask, so the row mask is not applied again)."""
    out = op.transpose(u)
    return out if col_mask is None else out * col_mask
