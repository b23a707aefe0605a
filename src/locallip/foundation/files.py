"""Files the stages write: atomic writes, digests, and a lock per stage output.

A stage writes its outputs only through these, so a crash or a bad input never
leaves a half-written file where a good one used to be, and two runs of the same
stage cannot interleave their writes.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Union

PathLike = Union[str, os.PathLike]


class StageBusy(RuntimeError):
    """Another process is running the same stage on the same output."""


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: PathLike, obj: Any) -> None:
    """JSON with NaN/inf refused: outputs never carry them (use null for 'no value')."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"refusing to write {path}: it would hold NaN or inf ({e})") from None
    write_text(path, text + "\n")


def csv_text(rows: List[dict]) -> str:
    """Rows (dicts with the same keys) as CSV text with a header; None is an empty cell."""
    if not rows:
        raise ValueError("no rows to write")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def read_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def file_digest(path: PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def stage_lock(output: PathLike, stage: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``.<output>.lock`` while a stage writes ``output``.

    A second run on the same output fails at once (StageBusy) instead of racing the
    first: the last writer would otherwise win, mixing one run's files with the
    other's. flock releases the lock when the process ends, however it ends; the
    lock file is removed on release (and a lock taken on a file that was removed
    meanwhile is retried, so two runs never both hold one).
    """
    import fcntl

    output = Path(output)
    lock = output.with_name(f".{output.name}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        os.close(fd)
    except PermissionError:
        raise PermissionError(f"{stage} cannot write to {lock.parent}: permission denied (its outputs go there; "
                              f"make the directory writable or choose another output)") from None
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise StageBusy(f"{stage} is already running for {output} (pid {holder}); wait for it to "
                                f"finish or stop it") from None
            raise
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed it while we waited: take a fresh one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield lock
    finally:
        try:
            lock.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the lock
