"""Files and archives behind the dataset loaders: local sources, safe extraction, torchvision."""
from __future__ import annotations

import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence
from urllib.error import URLError

from ..foundation.schema import DatasetConfig
from .splits import DataError



def source_path(ds: DatasetConfig) -> Optional[Path]:
    """``dataset.source`` as an existing path, or None when not set."""
    if ds.source is None or str(ds.source) == "":
        return None
    src = Path(os.path.expanduser(str(ds.source)))
    if not src.exists():
        raise DataError(f"dataset.source {str(src)!r} does not exist (dataset {ds.name!r})")
    return src


def root_dir(ds: DatasetConfig) -> Path:
    return Path(os.path.expanduser(str(ds.root)))


def safe_extract(archive: Path, dest: Path) -> None:
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
def as_directory(src: Path, scratch: Path) -> Iterator[Path]:
    """Yield ``src`` if it is a directory, else a temporary extraction of the archive (under ``scratch``)."""
    if src.is_dir():
        yield src
        return
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=scratch) as tmp:
        safe_extract(src, Path(tmp))
        yield Path(tmp)


def find_file(base: Path, names: Sequence[str], prefer: Sequence[Path] = ()) -> Optional[Path]:
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


def install_dir(extracted: Path, name: str, root: Path, archive: Path) -> Path:
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


def torchvision_dataset(cls, root: Path, train: bool, download: bool, label: str, hint: str):
    """Instantiate a torchvision dataset, turning its errors into DataError with guidance."""
    try:
        return cls(root=str(root), train=train, download=download)
    except (URLError, OSError, RuntimeError) as e:
        what = (f"cannot download {label}: no network?" if download
                else f"{label} not found or corrupted in {root} (dataset.download is false)")
        raise DataError(f"{what} ({type(e).__name__}: {first_line(e)}). {hint}") from e
    except (AssertionError, ValueError, TypeError, EOFError, pickle.UnpicklingError, KeyError) as e:
        raise DataError(f"cannot read {label} from {root}: {type(e).__name__}: {e}. {hint}") from e


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (torchvision's span several), shortened."""
    text = " ".join(str(e).split())
    text = text or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
