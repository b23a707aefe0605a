"""The layer protocol: what the bounds ask of every layer type.

A network, for the bounds, is an alternation ``op_0, act_0, op_1, act_1, ..., op_L``:
affine layers ``z = W h + b`` (each an ``AffineLayer``) and 1-Lipschitz activations
(each answering ``interval`` and ``masks``, see ``locallip.nn.activations``). The code
at the network level (``network_layers``, the local and global bounds, the exact level,
the margins) only iterates over these objects; a layer type keeps its own math here.

An affine layer is anything linear-plus-bias on per-sample tensors: a dense or
convolution layer, a residual block's ``I + W``, a pooling layer. What it must give:

* ``forward(h)``: ``W h + b`` exactly as the model computes it (the clean pass);
* ``linear(v)`` / ``transpose(u)``: ``W v`` and ``W^T u`` (no bias), for the norm solvers;
  masks are applied around them by the callers (``masked_linear``, ``masked_transpose``);
* ``abs_linear(v)``: ``|W| v`` with ``v >= 0``, or anything larger: the interval (IBP) radius;
* ``row_norms(col_mask)``: ``||row_k(W diag(col_mask))||_2`` per output, or anything larger:
  the ball bound of each pre-activation (``col_mask`` is any nonnegative tensor: a 0/1 mask, or the
  row norms of a layer before it, ``composed.py``);
* ``guaranteed_norm()``: a deterministic upper bound of ``||W||_2`` (float64, no gradient);
* ``explicit_matrix()``: ``W`` as a float64 CPU matrix [n_out, n_in] (the exact level's
  proofs and the oracle tests), and ``explicit_matrix_error()``, a bound of its distance from W
  where its entries are computed rather than placed (default 0);
* ``cast(dtype)``: the same operator with detached weights in another dtype;
* ``owner`` / ``weights_key()``: the module whose weights the layer reads, and a key that
  changes whenever they do (caches and ``GlobalBound`` are bound to it).

Everything else has a default written once in this class: the IBP ∩ ball box of the
pre-activations, an explicit matrix from ``linear`` on the unit basis, a guaranteed norm from
its SVD. The norm estimates (the training step's warm-started power iteration or Lanczos, the
masked solvers) need nothing more than ``linear`` and ``transpose``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

Tensor = torch.Tensor


def batch_norm2(t: Tensor) -> Tensor:
    """Per-sample l2 norm of a batch (every dimension but the first)."""
    return t.flatten(1).norm(dim=1)


def bcast(t: Tensor, like: Tensor) -> Tensor:
    """[B] values shaped to broadcast against ``like`` [B, ...]."""
    return t.view(-1, *([1] * (like.dim() - 1)))


class AffineLayer:
    """One affine layer ``z = W h + b`` as an operator on per-sample tensors of ``in_shape``."""

    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    #: The module whose weights this layer reads (caches are keyed on it).
    owner: nn.Module
    #: Whether the layer can give the logits (``logit_weights``): the margins need its rows.
    gives_logits = False

    # ------------------------------------------------------------------ what a layer type must give

    def forward(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def linear(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def transpose(self, u: Tensor) -> Tensor:
        raise NotImplementedError

    def abs_linear(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def row_norms(self, col_mask: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def cast(self, dtype: torch.dtype) -> "AffineLayer":
        raise NotImplementedError

    def weights_key(self) -> tuple:
        """Changes whenever the weights this layer reads change (identity and in-place version)."""
        return tuple((p.data_ptr(), p._version, tuple(p.shape), p.dtype) for p in self.owner.parameters())

    def logit_weights(self) -> Tuple[Tensor, Optional[Tensor]]:
        """(W [C, d], b [C]) of a last layer giving the logits from the flattened features."""
        raise ValueError("the model must end with a Linear layer giving the logits")

    # ------------------------------------------------------------------ defaults

    @property
    def dtype(self) -> torch.dtype:
        return next(self.owner.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.owner.parameters()).device

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)

    def explicit_matrix(self) -> Tensor:
        """[n_out, n_in] float64 matrix of ``linear``, column i = W e_i (exact for maps whose entries
        are weights; a layer type with a cheaper or exact construction overrides it)."""
        n = self.in_features
        op = self.cast(torch.float64)
        with torch.no_grad():
            basis = torch.eye(n, dtype=torch.float64, device=op.device).view(n, *self.in_shape)
            return op.linear(basis).reshape(n, -1).T.cpu()

    def explicit_matrix_error(self) -> float:
        """A bound of ||W - explicit_matrix()||_F: 0 where every entry is placed, not computed."""
        return 0.0

    def guaranteed_norm(self) -> Tensor:
        """A deterministic upper bound of ||W||_2 (float64): the SVD of the explicit matrix."""
        with torch.no_grad():
            return torch.linalg.matrix_norm(self.explicit_matrix(), ord=2)

    def interval(self, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
        """IBP: centre and radius of ``W h + b`` over the box [lo, hi]."""
        return self.forward((lo + hi) / 2), self.abs_linear((hi - lo) / 2)

    def input_box_radius(self, eps: Tensor, like: Tensor) -> Tensor:
        """IBP radius of the pre-activations over the input box x +- eps (the same for every sample):
        ``|W| 1 * eps``, computed once and broadcast."""
        ones = torch.full((1,) + tuple(self.in_shape), 1.0, dtype=like.dtype, device=like.device)
        return self.abs_linear(ones) * eps

    def pre_activation_box(self, z: Tensor, lo: Tensor, hi: Tensor, radius: Tensor, col_mask: Optional[Tensor],
                           input_eps: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """The IBP ∩ ball box (lb, ub) of the pre-activations whose clean value is ``z``.

        IBP through W and |W| from the box [lo, hi] of the layer input (or, with ``input_eps``,
        from the input box x +- eps, whose centre is the clean input); the ball bound
        |z_k(x') - z_k(x)| <= radius * ||row_k(W O)|| from the input's l2 radius.
        """
        if input_eps is not None:
            centre, spread = z, self.input_box_radius(input_eps, z)
        else:
            centre, spread = self.interval(lo, hi)
        ball = bcast(radius, z) * self.row_norms(col_mask)
        return torch.maximum(centre - spread, z - ball), torch.minimum(centre + spread, z + ball)


class ActivationBounds:
    """What the bounds ask of an activation (``LipschitzActivation`` gives it; adapters wrap others)."""

    def __call__(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def interval(self, lb: Tensor, ub: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def masks(self, lb: Tensor, ub: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def fixed_distance(self, lb: Tensor, ub: Tensor) -> Optional[Tensor]:
        return None


def check_input_shape(in_shape: Sequence[int], expected: int, what: str) -> None:
    if math.prod(in_shape) != expected:
        raise ValueError(f"{what} expects {expected} inputs, gets {tuple(in_shape)}")
