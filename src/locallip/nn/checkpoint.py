"""Models in checkpoints: the build spec, the weights as plain tensors, and JSON-able metadata.

A checkpoint never holds pickled code (``foundation.checkpoints`` loads with
``weights_only=True``); the model is rebuilt from its spec and the weights loaded into it.
"""
from __future__ import annotations

from typing import Any, Tuple

import torch

from ..foundation.checkpoints import FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from ..foundation.files import PathLike
from .describe import UnsupportedModel, real_tensor
from .models import model_from_spec


def save_model(path: PathLike, model, **extra: Any) -> None:
    """Atomically write ``{"format", "spec", "state_dict", **extra}``; extra must be plain data."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"format": FORMAT, "spec": dict(model.spec), "state_dict": state, **extra})


def load_model(path: PathLike, map_location: Any = "cpu") -> Tuple[Any, dict]:
    """Rebuild the model from its spec and load its weights; CheckpointError names any problem."""
    ckpt = load_checkpoint(path, map_location=map_location)
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {ckpt.get('format')!r}")
    try:
        for name, t in dict(ckpt["state_dict"]).items():
            real_tensor(name, t)  # a complex or bool tensor would be cast silently by load_state_dict
    except (UnsupportedModel, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        model = model_from_spec(ckpt["spec"])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not match the recorded model spec: {e}") from None
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or inf")
    return model, ckpt
