"""Outputs appear whole or not at all, inputs are never touched, and one output has one writer at a time.

A run holds an exclusive lock on its output (``OutputLock``: ``flock`` on ``.NAME.obsdiff-lock`` beside it, the file
naming the holder's pid); a second run into the same output is refused in one line, so a staging folder is only
ever cleared by the run that owns it. Every output folder is built in a predictable hidden staging folder beside it
(``.NAME.obsdiff-staging``, cleared by the next run if a killed one left it) and moved into place by renames at the
end; single files are
written to a temporary name, fsynced, then renamed. ``check_disjoint`` refuses an output that is, contains or
lies inside an input. ``fault_point`` lets tests kill a run, or one rank of it, at a stage boundary
(``OBSDIFF_FAULT=stage[:signal][#n][@rank]``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
from pathlib import Path

from obsdiff.errors import UsageError

log = logging.getLogger(__name__)

STAGING_SUFFIX = ".obsdiff-staging"
OLD_SUFFIX = ".obsdiff-old"
LOCK_SUFFIX = ".obsdiff-lock"


class OutputLock:
    """An exclusive lock on one output path for as long as a run writes it (its staging, checkpoints, the rename).

    ``flock`` is released by the kernel when the holder dies, so a killed run never blocks the next one; the lock file
    a killed run leaves is simply taken over. A run that finds the lock held is refused, naming the holder's pid.
    """

    def __init__(self, final: Path, what: str = "--out") -> None:
        self.final, self.what = Path(final), what
        self.path = self.final.with_name(f".{self.final.name}{LOCK_SUFFIX}")
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(f"{self.what} {self.final} is being written by another obsdiff run (pid {holder}): "
                                 "wait for it to finish, or choose another output") from None
            try:  # a finishing run may have removed the file between our open and flock: lock a fresh one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody can be waiting on this inode
        finally:
            os.close(self.fd)
            self.fd = None


def staging_path(final: Path, suffix: str = STAGING_SUFFIX) -> Path:
    """The hidden work folder beside ``final``; a stale one from a killed run is removed first."""
    path = final.with_name(f".{final.name}{suffix}")
    if path.exists() or path.is_symlink():
        log.info("removing %s, left by an interrupted run", path)
        remove(path)
    return path


def discard_staging(final: Path, suffix: str = STAGING_SUFFIX) -> None:
    """Remove this run's own hidden work folder beside ``final`` (after publishing, or on failure)."""
    remove(final.with_name(f".{final.name}{suffix}"))


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_dir(new: Path, final: Path) -> None:
    """Move ``new`` to ``final``; an existing ``final`` is set aside first and removed only once ``new`` is in place."""
    old = final.with_name(f".{final.name}{OLD_SUFFIX}")
    remove(old)
    if final.exists():
        final.rename(old)
    try:
        new.rename(final)
    except BaseException:
        if old.exists() and not final.exists():
            old.rename(final)
        raise
    remove(old)
    _fsync_dir(final.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_disjoint(output: Path, inputs: dict[str, Path], output_name: str = "--out") -> None:
    """Refuse an output that is, contains, or lies inside one of the inputs (it would be replaced or deleted)."""
    out = Path(output).resolve()
    for what, path in inputs.items():
        if path is not None and _related(out, Path(path).resolve()):
            raise UsageError(f"{output_name} {output} overlaps the {what} {path}: choose an output outside it "
                             "(obsdiff never writes over its inputs)")


def check_output_dir(output: Path, inputs: dict[str, Path | None], overwrite: bool) -> None:
    """An output folder a run may create or replace: disjoint from its inputs, not already there unless
    ``overwrite``, not a file, inside a folder that exists."""
    check_disjoint(output, inputs)
    if output.exists() and not overwrite:
        raise UsageError(f"{output} already exists (pass --overwrite to replace it)")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} exists and is not a folder")
    if not output.parent.is_dir():
        raise UsageError(f"{output.parent} does not exist")


class Terminated(BaseException):
    """SIGTERM as an exception, so that every ``finally`` and staging clean-up runs (like Ctrl-C)."""


def raise_on_sigterm() -> None:
    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


_fault_hits: dict[str, int] = {}  # how often each stage was reached in this process (test hook only)


def fault_point(stage: str, rank: int = 0) -> None:
    """Test hook: ``OBSDIFF_FAULT=stage[:signal][#n][@rank]`` sends this process the signal here (default SIGKILL: no
    clean-up at all; SIGINT: a KeyboardInterrupt, as Ctrl-C) the ``n``-th time the stage is reached (default the
    first); with ``@rank``, only that rank of a distributed run. The one way tests interrupt a run."""
    spec, _, only_rank = os.environ.get("OBSDIFF_FAULT", "").partition("@")
    spec, _, nth = spec.partition("#")
    name, _, sig = spec.partition(":")
    if name != stage or (only_rank and int(only_rank) != rank):
        return
    _fault_hits[stage] = _fault_hits.get(stage, 0) + 1
    if _fault_hits[stage] == int(nth or 1):
        log.error("fault injection: %s at %s (rank %d)", sig or "SIGKILL", stage, rank)
        os.kill(os.getpid(), getattr(signal, sig or "SIGKILL"))
