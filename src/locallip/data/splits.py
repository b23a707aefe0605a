"""The splits every stage reads: one ``.npz`` of uint8 images and int64 labels per experiment.

Splits: ``val`` (early stopping, checkpoint choice) and ``calib`` (threshold
calibration) are held out of the training data, so the ``test`` split is only ever
touched by certification. Arrays are stored as uint8 pixels ``[N, C, H, W]`` and
int64 labels; ``to_tensors`` makes float tensors in [0, 1] (normalisation is
folded into the first layer). ``meta`` records sizes and a sha256 of every array.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from ..foundation.files import atomic_path

FORMAT_VERSION = 1


class DataError(ValueError):
    """A dataset is unknown, missing, corrupt, or cannot be split as configured."""


SPLITS = ("train", "val", "calib", "test")
ARRAY_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("x", "y"))


@dataclass
class Splits:
    """The four splits (uint8 pixels [N, C, H, W], int64 labels [N]) and their description.

    ``indices`` (optional) maps a split name to the positions of its examples in the
    source pool (the official training set, or the official test set for ``test``;
    for datasets without an official test, the whole pool): provenance, and a way to
    check that splits are disjoint.
    """

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    calib_x: np.ndarray
    calib_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    meta: dict
    indices: dict = field(default_factory=dict)

    def arrays(self) -> dict:
        """The eight arrays by npz key (``train_x``, ``train_y``, ...)."""
        return {k: getattr(self, k) for k in ARRAY_KEYS}

    def sizes(self) -> dict:
        return {s: int(len(getattr(self, f"{s}_y"))) for s in SPLITS}


def array_sha256(a: np.ndarray) -> str:
    """sha256 of an array's bytes (C order): identifies split contents in meta."""
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).reshape(-1)).hexdigest()


def describe(splits: Splits) -> None:
    """(Re)compute the parts of meta that are derived from the arrays: sizes and hashes."""
    splits.meta["sizes"] = splits.sizes()
    splits.meta["sha256"] = {k: array_sha256(a) for k, a in splits.arrays().items()}


# --------------------------------------------------------------------------- save / load


def _check_splits(splits: Splits) -> None:
    """Arrays have the documented dtypes and shapes, consistent with meta."""
    shape = tuple(splits.meta.get("input_shape") or ())
    for s in SPLITS:
        x, y = getattr(splits, f"{s}_x"), getattr(splits, f"{s}_y")
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"{s}_x must be a uint8 array [N, C, H, W], got "
                            f"{getattr(x, 'dtype', type(x).__name__)} {list(getattr(x, 'shape', []))}")
        if shape and tuple(x.shape[1:]) != shape:
            raise DataError(f"{s}_x has images of shape {list(x.shape[1:])}, meta says {list(shape)}")
        if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{s}_y must be an int64 array with one label per image ({len(x)}), got "
                            f"{getattr(y, 'dtype', type(y).__name__)} {list(getattr(y, 'shape', []))}")
        classes = splits.meta.get("num_classes")
        if len(y) and isinstance(classes, int) and (int(y.min()) < 0 or int(y.max()) >= classes):
            bad = y[(y < 0) | (y >= classes)]
            raise DataError(f"{s}_y holds labels outside [0, {classes}) (e.g. {int(bad[0])}; {len(bad)} of {len(y)}): "
                            f"the data does not match its {classes} classes")
    for s in ("val", "calib", "test"):  # training may be empty for a certify-only file, never these
        if len(getattr(splits, f"{s}_y")) == 0:
            raise DataError(f"the {s} split is empty: every stage after training needs examples in it")


def save_splits(splits: Splits, path) -> None:
    """Write all splits to one ``.npz`` (meta as a JSON string), atomically: all or nothing."""
    _check_splits(splits)
    describe(splits)
    arrays = dict(splits.arrays())
    for s, idx in (splits.indices or {}).items():
        arrays[f"{s}_index"] = np.asarray(idx, dtype=np.int64)
    arrays["meta"] = np.array(json.dumps(splits.meta, sort_keys=True))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            # Compressed: MNIST-sized splits stay under Snakemake's 1 MB checksum limit, so a
            # touched file with the same content reruns nothing even without a profile.
            np.savez_compressed(f, **arrays)


def read_npz(path, what: str = "points file") -> dict:
    """Every array of an ``.npz`` archive; DataError naming the file if it is not one (a ``.npy``,
    a truncated or corrupt archive) or holds Python objects (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            npy = f.read(6) == b"\x93NUMPY"
        raise DataError(f"cannot read {what} {path}: it is "
                        f"{'a single .npy array' if npy else 'not an .npz archive (truncated or corrupt?)'}; "
                        f"a {what} is an .npz archive of named arrays")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # zip/CRC/format errors come in many types
        if "allow_pickle" in str(e):
            raise DataError(f"{path} holds Python objects (pickled arrays); refused, since loading them could run "
                            f"code. A {what} holds only numbers") from None
        raise DataError(f"cannot read {what} {path}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def load_splits(path) -> Splits:
    """Read a splits file written by ``save_splits``; DataError if missing, corrupt or incomplete."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"splits file not found: {path} (run `locallip download` first)")
    arrays = read_npz(path, "splits file")
    missing = [k for k in ARRAY_KEYS + ("meta",) if k not in arrays]
    if missing:
        raise DataError(f"{path} is not a locallip splits file: missing {', '.join(missing)}")
    meta_arr = arrays.pop("meta")
    try:
        if meta_arr.ndim != 0 or meta_arr.dtype.kind != "U":
            raise ValueError(f"meta is a {meta_arr.dtype} array of shape {list(meta_arr.shape)}")
        meta = json.loads(meta_arr.item())
        if not isinstance(meta, dict):
            raise ValueError("meta is not a JSON object")
    except ValueError as e:
        raise DataError(f"{path}: bad meta: {e}") from e
    indices = {s: arrays[f"{s}_index"] for s in SPLITS if f"{s}_index" in arrays}
    splits = Splits(**{k: arrays[k] for k in ARRAY_KEYS}, meta=meta, indices=indices)
    _check_splits(splits)
    for k, a in splits.arrays().items():
        expected = meta.get("sha256", {}).get(k)
        if expected is not None and array_sha256(a) != expected:
            raise DataError(f"{path}: {k} does not match the sha256 recorded in its meta (corrupt file?)")
    return splits


# --------------------------------------------------------------------------- tensors & augmentation


def to_tensors(x_uint8: np.ndarray, y: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 pixels [N, C, H, W] -> float32 tensor in [0, 1]; labels -> int64 tensor."""
    x_uint8 = np.asarray(x_uint8)
    if x_uint8.dtype != np.uint8:
        raise DataError(f"to_tensors expects uint8 pixels, got {x_uint8.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(x_uint8)).to(torch.float32).div_(255.0)
    return x, torch.as_tensor(np.asarray(y), dtype=torch.long)


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4, mode: str = "zeros") -> torch.Tensor:
    """Random crop (pad ``pad`` pixels, ``zeros`` or ``reflect``) and horizontal flip, per image.

    Batched: one gather for the whole batch. Deterministic given the generator's state.
    """
    if x.ndim != 4:
        raise ValueError(f"augment expects [N, C, H, W], got shape {list(x.shape)}")
    if mode not in ("zeros", "reflect"):
        raise ValueError(f"augment mode must be 'zeros' or 'reflect', got {mode!r}")
    n, c, h, w = x.shape
    gdev = generator.device
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(n, generator=generator, device=gdev) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="constant" if mode == "zeros" else "reflect")
    rows = oy[:, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + ox[:, None]  # [N, W]
    bi = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]
