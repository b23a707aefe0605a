"""Checkpoints as plain tensors + JSON-able metadata: no pickled code, identical bytes for
identical contents.

torch is imported inside the functions: the foundation imports no torch at import time.
Models are saved and rebuilt by ``locallip.nn.checkpoint``.
"""
from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Tuple

from .files import PathLike, write_bytes

FORMAT = "locallip-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or not a locallip checkpoint."""


def save_checkpoint(path: PathLike, obj: dict) -> None:
    """torch.save into memory, then one atomic write: never half-written, and the same contents
    always give the same bytes (saving to a temporary *path* records its random name inside)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint without executing pickled code (``weights_only=True``)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or carries non-tensor pickled objects
        raise CheckpointError(f"cannot load checkpoint {path}: {load_error(e)}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj or "spec" not in obj:
        raise CheckpointError(f"{path} is not a locallip checkpoint (needs 'spec' and 'state_dict')")
    return obj


def load_error(e: BaseException) -> str:
    """What went wrong, without library advice to load the file unsafely (which we never do), on one line
    and without terminal colour codes."""
    msg = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(e))
    if "Weights only load failed" in msg:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        what = f" ({m.group(1)})" if m else ""
        return (f"it holds pickled objects other than tensors and plain data{what}; refused, since "
                f"loading them could run code")
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    return f"{type(e).__name__}: {first[:300]}"
