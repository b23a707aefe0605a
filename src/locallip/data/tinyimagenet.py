"""Tiny-ImageNet-200: the official zip (md5-checked), from a local folder, archive or a download.

Its labelled ``val`` set is the test split.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Tuple
from urllib.error import URLError

import numpy as np

from ..foundation.schema import DatasetConfig
from ..foundation.files import file_digest
from .archives import as_directory, first_line, install_dir, root_dir, source_path
from ..foundation.catalog import DATASETS
from .raw import Raw
from .splits import DataError

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINYIMAGENET_DIR = "tiny-imagenet-200"



def _tiny_dir(ds: DatasetConfig) -> Tuple[Path, str]:
    """The extracted ``tiny-imagenet-200`` folder: from ``source``, the cache, or a download."""
    root = root_dir(ds)
    cached = root / TINYIMAGENET_DIR
    src = source_path(ds)
    if src is not None and src.is_dir():
        if (src / "wnids.txt").is_file():
            return src, str(src)
        if (src / TINYIMAGENET_DIR / "wnids.txt").is_file():
            return src / TINYIMAGENET_DIR, str(src / TINYIMAGENET_DIR)
        if not (src / "tiny-imagenet-200.zip").is_file():
            raise DataError(f"dataset.source {src} holds neither wnids.txt, {TINYIMAGENET_DIR}/ "
                            f"nor tiny-imagenet-200.zip")
        src = src / "tiny-imagenet-200.zip"
    if src is None and (cached / "wnids.txt").is_file():
        return cached, f"{cached}"
    if src is None:
        if not ds.download:
            raise DataError(f"Tiny-ImageNet not found in {cached} and dataset.download is false; "
                            f"pass dataset.source=<tiny-imagenet-200.zip or its extracted folder>")
        src = _download_tiny(root)
    md5 = file_digest(src, "md5")
    if md5 != TINYIMAGENET_MD5:
        raise DataError(f"{src}: md5 {md5} does not match the official tiny-imagenet-200.zip "
                        f"({TINYIMAGENET_MD5}); re-download it or pass its extracted folder")
    with as_directory(src, root) as extracted:
        install_dir(extracted, TINYIMAGENET_DIR, root, src)
    return cached, f"{src} (md5 ok, extracted into {cached})"


def _download_tiny(root: Path) -> Path:
    from torchvision.datasets import utils as tv_utils

    try:
        tv_utils.download_url(TINYIMAGENET_URL, str(root), "tiny-imagenet-200.zip", TINYIMAGENET_MD5)
    except (URLError, OSError, RuntimeError) as e:
        raise DataError(f"cannot download Tiny-ImageNet from {TINYIMAGENET_URL}: no network? "
                        f"({type(e).__name__}: {first_line(e)}). Put tiny-imagenet-200.zip somewhere "
                        f"and pass dataset.source=<it>") from e
    return root / "tiny-imagenet-200.zip"


def _read_images(paths: List[Path], size: Tuple[int, int]) -> np.ndarray:
    """Decode JPEGs (grayscale -> RGB) into uint8 [N, 3, H, W]; threads overlap the decoding."""
    from PIL import Image

    out = np.empty((len(paths), 3, size[1], size[0]), dtype=np.uint8)

    def one(i: int) -> None:
        try:
            with Image.open(paths[i]) as im:
                im = im.convert("RGB")
                if im.size != size:
                    raise DataError(f"{paths[i]}: image is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]}")
                out[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        except DataError:
            raise
        except Exception as e:  # PIL raises many types for a broken file
            raise DataError(f"cannot decode {paths[i]}: {type(e).__name__}: {e}") from e

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(one, range(len(paths)), chunksize=256))
    return out


def _read_lines(path: Path) -> List[str]:
    if not path.is_file():
        raise DataError(f"Tiny-ImageNet: missing {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_tinyimagenet(ds: DatasetConfig) -> Raw:
    """Official layout: wnids.txt, train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    d, source = _tiny_dir(ds)
    wnids = sorted(set(_read_lines(d / "wnids.txt")))
    if not wnids or len(wnids) > DATASETS["tinyimagenet"]["num_classes"]:
        raise DataError(f"{d / 'wnids.txt'} lists {len(wnids)} classes, expected 200")
    label = {w: i for i, w in enumerate(wnids)}
    train_paths, train_y = [], []
    for w in wnids:
        files = sorted((d / "train" / w / "images").glob("*.JPEG"))
        if not files:
            raise DataError(f"Tiny-ImageNet: no training images in {d / 'train' / w / 'images'}")
        train_paths += files
        train_y += [label[w]] * len(files)
    test_paths, test_y = [], []
    for line in _read_lines(d / "val" / "val_annotations.txt"):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in label:
            raise DataError(f"{d / 'val' / 'val_annotations.txt'}: bad line {line!r}")
        p = d / "val" / "images" / parts[0]
        if not p.is_file():
            raise DataError(f"Tiny-ImageNet: {p} is listed in val_annotations.txt but missing")
        test_paths.append(p)
        test_y.append(label[parts[1]])
    names = _tiny_class_names(d, wnids)
    return Raw(_read_images(train_paths, (64, 64)), np.asarray(train_y, dtype=np.int64),
                _read_images(test_paths, (64, 64)), np.asarray(test_y, dtype=np.int64), source, names)


def _tiny_class_names(d: Path, wnids: List[str]) -> List[str]:
    """Human-readable names from words.txt when present, else the wnids."""
    words = {}
    if (d / "words.txt").is_file():
        for line in (d / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.strip()
    return [words.get(w) or w for w in wnids]
