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
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Sequence, Union

PathLike = Union[str, os.PathLike]


class StageBusy(RuntimeError):
    """Another process is running the same stage on the same output."""


class UnsafeOutput(ValueError):
    """An output path that would write outside the chosen results, or over something not ours."""


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
        try:
            yield tmp
            os.replace(tmp, path)
        except OSError as e:
            if e.filename or not e.errno:  # already names its file
                raise
            # a full disk or a failing device: name the file (the earlier version is still in place)
            raise OSError(e.errno, f"cannot write {path}: {e.strerror} (the previous version, if any, "
                                   f"is unchanged)") from None
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
    def refuse(token: str):  # outputs never hold NaN or inf (write_json refuses them): this one was edited
        raise ValueError(f"{path} holds {token}, which no locallip output contains (a damaged or edited file)")

    try:
        return json.loads(path.read_text(), parse_constant=refuse)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path} is not a JSON text ({type(e).__name__})") from None


def file_digest(path: PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _open_lock(lock: Path, stage: str) -> int:
    """The lock file, opened without following a symbolic link (and only if it is a regular file).

    The lock is truncated and written with the holder's pid: through a link planted at its
    name that would write to any file the user can write, outside the results directory.
    """
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeOutput(f"{lock} is a symbolic link; {stage} refuses to write through it (remove it and "
                               f"rerun)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeOutput(f"{lock} is not a regular file; {stage} refuses to use it as its lock (remove it and "
                           f"rerun)")
    return fd


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
        os.close(_open_lock(lock, stage))
    except PermissionError:
        raise PermissionError(f"{stage} cannot write to {lock.parent}: permission denied (its outputs go there; "
                              f"make the directory writable or choose another output)") from None
    while True:
        fd = _open_lock(lock, stage)
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


# --------------------------------------------------------------------------- whole output directories


def check_replaceable(out: PathLike, stage: str, own: Sequence[str]) -> None:
    """Refuse an output directory that ``replaced_directory`` must not replace: a file, a device, a
    link, or a directory holding anything but ``own`` entries (a pipeline experiment, the inputs)."""
    out = Path(out)
    if out.is_symlink():
        raise UnsafeOutput(f"{out} is a symbolic link; {stage} writes a directory of its own there: choose "
                           f"another output directory")
    if out.exists() and not out.is_dir():
        raise UnsafeOutput(f"{out} exists and is not a directory; {stage} writes a directory of outputs: choose "
                           f"another output directory")
    if out.is_dir():
        # hidden entries too (a .git would go with the directory), except a lock or temporary file of ours
        foreign = sorted(e.name for e in out.iterdir()
                         if e.name not in own and not (e.name.startswith(".") and e.name.endswith((".lock", ".tmp"))))
        if foreign:
            raise UnsafeOutput(f"{out} holds {', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}, which "
                               f"{stage} did not write (another experiment's results?); {stage} replaces the "
                               f"whole directory, so choose another output directory")


@contextmanager
def replaced_directory(out: PathLike, stage: str, own: Sequence[str],
                       publish_on: tuple = ()) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``out`` as a whole.

    A run that fails or is interrupted leaves ``out`` as it was, never one run's files mixed
    with another's; one that fails with an exception in ``publish_on`` (a failed attack audit:
    its record must be seen) replaces ``out`` all the same, and the error then names ``out``.
    Holds ``stage_lock(out)`` throughout. A run killed between the two renames leaves the old
    directory as ``.<out>.<pid>.old``: the next run puts it back first.
    """
    out = Path(out)
    check_replaceable(out, stage, own)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PermissionError(f"{stage} cannot write to {out.parent}: {e.strerror}") from None
    with stage_lock(out, stage):
        leftovers = sorted(out.parent.glob(f".{glob_escape(out.name)}.*.old"))
        if leftovers and not out.exists():
            os.replace(leftovers.pop(), out)
        for stale in leftovers + sorted(out.parent.glob(f".{glob_escape(out.name)}.*.partial")):
            shutil.rmtree(stale, ignore_errors=True)  # a killed run's (we hold the lock: nobody else's)
        check_replaceable(out, stage, own)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        try:
            try:
                yield staging
            except publish_on as e:
                _swap(staging, out)
                if len(e.args) == 1 and isinstance(e.args[0], str):
                    e.args = (e.args[0].replace(str(staging), str(out)),)
                raise
            _swap(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _swap(staging: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def glob_escape(name: str) -> str:
    import glob

    return glob.escape(name)


def check_distinct(inputs: Mapping[str, Any], outputs: Mapping[str, Any], what: str) -> None:
    """Refuse an output path that is one of the inputs (or another output): writing it would destroy
    the input (``--table results/x/calibrate/model.pt``)."""
    def flat(items):
        for key, value in items.items():
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if v is not None:
                    yield key, Path(v)

    seen = {os.path.realpath(p): key for key, p in flat(inputs)}
    for key, p in flat(outputs):
        real = os.path.realpath(p)
        if real in seen:
            raise UnsafeOutput(f"{what}: output {key} {p} is also {seen[real]}; writing it would destroy that "
                               f"file: choose another path")
        seen[real] = f"output {key}"


def keep_copy(files: Sequence[PathLike], directory: PathLike) -> Path:
    """Put the just-written ``files`` into ``directory`` too (a hard link where it can: outputs are
    replaced by rename, never rewritten in place, so the kept copy stays as it is)."""
    directory = Path(directory)
    for f in map(Path, files):
        with atomic_path(directory / f.name) as tmp:
            tmp.unlink()
            try:
                os.link(f, tmp)
            except OSError:
                shutil.copy2(f, tmp)
    return directory
