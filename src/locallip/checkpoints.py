"""Save and load models as plain tensors + JSON-able metadata (no pickled code)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Tuple

import torch

from .io import CheckpointError, load_checkpoint, save_checkpoint
from .nn.models import LipschitzNet, model_from_spec

FORMAT = "locallip-checkpoint-1"


def save_model(path: Path, model: LipschitzNet, **extra: Any) -> None:
    """Atomically write ``{"format", "spec", "state_dict", **extra}``; extra must be plain data."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    save_checkpoint(path, {"format": FORMAT, "spec": dict(model.spec), "state_dict": state, **extra})


def load_model(path: Path, map_location: Any = "cpu") -> Tuple[LipschitzNet, dict]:
    """Rebuild the model from its spec and load its weights; CheckpointError names any problem."""
    ckpt = load_checkpoint(path, map_location=map_location)
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {ckpt.get('format')!r}")
    try:
        model = model_from_spec(ckpt["spec"])
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not match the recorded model spec: {e}") from e
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {name} holds NaN or inf")
    return model, ckpt
