"""Global (GloRo) Lipschitz bound: K = prod_{l<L} ||W_l||_2 of the penultimate features.

The margin z_y - z_j then moves by at most eps * K * ||w_y - w_j|| on an eps-ball.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from .operators import AffineOp, network_layers
from .krylov import lanczos_norm
from .spectral import power_iteration_norm, restarted_lanczos_norm

Tensor = torch.Tensor

GUARANTEED = ("upper bound: exact SVD (dense); for convolutions the smaller of the FFT circulant-embedding bound "
              "and a Cholesky proof on the explicit operator")
ESTIMATE = "estimate: power iteration (approaches the norm from below)"


@dataclass
class GlobalBound:
    layer_norms: Tensor  # [L-1] spectral norm of each layer before the logits
    lipschitz: Tensor  # product: Lipschitz bound of the penultimate features
    guarantee: str  # GUARANTEED or ESTIMATE
    method: str
    vectors: Optional[list] = None  # top right singular vector per layer (warm starts), filled on demand


def _polyphase_kernel(w: Tensor, stride: Tuple[int, int], padding: Tuple[int, int]) -> Tensor:
    """Kernel of the stride-1 convolution that a strided one is on its polyphase components.

    Input pixel s*m + rho is pixel m of component rho, so tap a of a stride-s
    conv reads component (a - p) mod s at offset floor((a - p) / s).
    """
    (sh, sw), (ph, pw) = stride, padding
    co, ci, kh, kw = w.shape
    qh = [(a - ph) // sh for a in range(kh)]
    qw = [(a - pw) // sw for a in range(kw)]
    out = w.new_zeros(co, ci * sh * sw, max(qh) - min(qh) + 1, max(qw) - min(qw) + 1)
    for ah in range(kh):
        for aw in range(kw):
            rh, rw = (ah - ph) % sh, (aw - pw) % sw
            out[:, rh * sw + rw::sh * sw, qh[ah] - min(qh), qw[aw] - min(qw)] = w[:, :, ah, aw]
    return out


def _conv_norm_upper(op: AffineOp) -> Tensor:
    """Upper bound of a zero-padded, possibly strided convolution's spectral norm.

    A stride-s conv is a stride-1 conv on the s*s polyphase components of its
    input (a permutation, so norm-preserving). That conv is a restriction of a
    circular convolution on a torus large enough that nothing wraps around
    (zero-embedded input, subset of outputs), whose norm is the largest singular
    value of the kernel's 2-D DFT over all frequencies.
    """
    w = op.weight.detach().double()
    if op.norm is not None:
        w = w / op.norm.std.double().view(1, -1, 1, 1)
    _, h, wd = op.in_shape
    (sh, sw) = op.layer.stride
    k = _polyphase_kernel(w, op.layer.stride, op.layer.padding)
    size = (-(-h // sh) + k.shape[2] + 1, -(-wd // sw) + k.shape[3] + 1)
    spectrum = torch.fft.fft2(k, s=size)  # [co, ci*s*s, N, M]
    return torch.linalg.matrix_norm(spectrum.permute(2, 3, 0, 1), ord=2).max()


def _conv_norm(op: AffineOp) -> Tensor:
    """The FFT bound, or the Cholesky proof on the explicit operator where it fits and is smaller."""
    from .exact import proven_layer_norm

    fft = _conv_norm_upper(op)
    proof = proven_layer_norm(op)
    return fft if proof is None else torch.minimum(fft, torch.tensor(proof, dtype=fft.dtype))


def _dense_norm_exact(op: AffineOp) -> Tensor:
    w = op.weight.detach().double()
    if op.norm is not None:  # Normalize before Linear: scale every flattened input by 1/std of its channel
        scale = (1.0 / op.norm.std.double()).expand(op.in_shape).reshape(1, -1)
        w = w * scale
    return torch.linalg.matrix_norm(w, ord=2)


# Backward-stable SVD/FFT errors are ~1e-13 relative in float64; 1e-9 covers them with room.
_ROUNDING_SLACK = 1e-9


def global_bound(model: nn.Sequential, method: str = "guaranteed", iters: int = 1, update: bool = True,
                 input_shape: Optional[Sequence[int]] = None) -> GlobalBound:
    """Global Lipschitz bound of the penultimate features: per-layer norms and their product.

    method="guaranteed" (default): certified upper bounds (no gradient, float64): exact SVD
      for dense layers; for convolutions an FFT circulant-embedding bound, or a Cholesky proof
      on the explicit operator (``bounds.exact``) where the layer fits its budget and the
      proof is smaller (cached per layer until its weights change).
    method="power" / "krylov": ``iters`` power iterations (or plain Lanczos steps) per layer,
      warm-started from the vectors kept in the model's buffers (updated when ``update``);
      differentiable (training). An estimate from below, which the warm start keeps close:
      a few Lanczos steps from last step's vector track the norm within ~0.1 %, where two
      power iterations trail it by several percent on these layers.
    ``input_shape`` (C, H, W) is needed for convolutional networks without an
    ``input_shape`` attribute (a dense network's comes from its first layer).
    """
    if input_shape is None and not hasattr(model, "input_shape"):
        first = next((m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if isinstance(first, nn.Linear):
            input_shape = (first.in_features,)
    ops, _ = network_layers(model, input_shape=input_shape)
    hidden = ops[:-1]
    if method == "guaranteed":
        with torch.no_grad():
            norms = [(_conv_norm(op) if isinstance(op.layer, nn.Conv2d)
                      else _dense_norm_exact(op)) * (1 + _ROUNDING_SLACK) for op in hidden]
            norms = torch.stack(norms) if norms else torch.zeros(0, dtype=torch.float64)
        dtype = ops[0].weight.dtype
        norms = norms.to(dtype) if dtype == torch.float64 else norms.to(dtype) * (1 + 1e-6)
        return GlobalBound(norms, norms.prod(), GUARANTEED, method)
    if method not in ("power", "krylov"):
        raise ValueError(f"unknown global bound method {method!r}; use 'power', 'krylov' or 'guaranteed'")
    vectors = model.power_vectors() if hasattr(model, "power_vectors") else None
    norms = []
    for i, op in enumerate(hidden):
        if vectors is not None:
            v0 = vectors[i].view(1, *op.in_shape).to(op.weight.dtype)
        else:
            v0 = torch.randn((1,) + op.in_shape, dtype=op.weight.dtype, device=op.weight.device)
        if method == "krylov":
            res = lanczos_norm(op, None, None, v0, steps=iters)
        else:
            res = power_iteration_norm(op, None, None, v0, iterations=iters, tol=0.0)
        if update and vectors is not None:
            vectors[i].copy_(res.vector.reshape(-1))
        norms.append(res.sigma[0])
    norms = torch.stack(norms) if norms else ops[0].weight.new_zeros(0)
    return GlobalBound(norms, norms.prod(), ESTIMATE, method)


def top_singular_vectors(model: nn.Module, input_shape: Sequence[int], *, tol: float = 1e-3,
                         max_applications: int = 500, seed: int = 0) -> list:
    """[n_in] flattened top right singular vector of every layer before the logits (unit, detached).

    Lanczos to ``tol`` on each unmasked layer, once per model. A warm start for masked
    estimates (the masked operator's top vector is near it when the masks remove little);
    nothing sound rests on it.
    """
    ops, _ = network_layers(model, input_shape=input_shape)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for op in ops[:-1]:
            v0 = torch.randn((1,) + tuple(op.in_shape), generator=gen, dtype=op.weight.dtype).to(op.weight.device)
            res = restarted_lanczos_norm(op, None, None, v0, max_applications=max_applications, tol=tol)
            out.append(res.vector.reshape(-1))
    return out
