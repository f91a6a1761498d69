"""Atomic file writing, shared by every writer in the project (checkpoints, configs, graphs, pages, corpora).

A file is written to a temporary name beside its destination (``.NAME.tmp<pid>``) and renamed into place, so a
full disk, Ctrl-C or ``kill -9`` never leaves a half-written file under the real name.  What a killed process
leaves behind under the temporary name is recognised by its pid and removed (`remove_leftovers`: by the next
trace into the folder, and by the next training that locks it).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator

from .errors import BadInputError


_UMASK = os.umask(0o022)  # read once (os.umask can only read by setting), then put back
os.umask(_UMASK)


def temp_path(path: str | Path) -> Path:
    """The temporary name ``path`` is written under before its rename: ``.NAME.tmp<pid>`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp``; on leaving, it is renamed to ``p`` (its folder created
    first).  On any failure (a full disk, Ctrl-C) the temporary file is removed and ``p`` is untouched.
    ``durable``: the file's bytes reach the disk before the rename, and the rename after it (fsync), so that a
    power cut or a kernel crash, not only a killed process, leaves the old file or the new one, never an empty one
    (checkpoints and modules: hours of training; a graph or a page can be written again)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        if tmp.exists():  # some writers (safetensors) create their file private (0600): give it the usual mode
            os.chmod(tmp, 0o666 & ~_UMASK)
            if durable:
                _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(path.parent)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk; a file system that cannot (some network or
    virtual ones refuse a folder's fsync) is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_folder(folder: str | Path, what: str) -> Path:
    """Create ``folder`` (and its parents) now, before the work that will write there; one BadInputError line
    naming ``what`` (e.g. "the activation cache") where it cannot be created."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot create {what} {folder}: {e.strerror or e}") from None
    if not os.access(folder, os.W_OK | os.X_OK):  # read-only (a mount, or its mode): say so now, not hours later
        raise BadInputError(f"cannot write into {what} {folder}: it is read-only; choose another folder")
    return folder


@contextlib.contextmanager
def exclusive_folder(folder: str | Path, what: str, lock: bool = True) -> Iterator[Path]:
    """Create ``folder`` (`make_folder`) and, with ``lock``, hold an exclusive lock on it (``flock`` on the folder
    itself) while the block runs: a second run into the same folder is refused in one line instead of mixing its
    files with the first's.  The folders this run created (``folder`` and any missing parents) that it left empty
    (it failed) are removed at the end."""
    import fcntl

    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    make_folder(folder, what)
    fd = os.open(folder, os.O_RDONLY)
    try:
        if lock:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BadInputError(f"another run is writing to {what} {folder}; wait for it to end, or choose "
                                    "another folder") from None
        if lock:
            remove_leftovers(folder)  # what a killed run left (the lock keeps live ones out)
        try:
            yield folder
        finally:
            for p in created:
                try:
                    p.rmdir()  # only if empty
                except OSError:
                    break
    finally:
        os.close(fd)  # releases the lock


_LEFTOVER = re.compile(r"^\.(?:run-(\d+)-.+|.+\.tmp(\d+))$")  # `temp_path` files, cli.outputs' run folders


def remove_leftovers(folder: Path) -> None:
    """Remove the temporary folders and files (`temp_path`) that processes no longer running left in ``folder``
    (kill -9 runs no cleanup)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if m and not process_alive(int(m.group(1) or m.group(2))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` is running (this one included)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = False) -> None:
    """Write bytes to ``path`` atomically (see `atomic_path`, ``durable`` too)."""
    with atomic_path(path, durable) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, durable: bool = False) -> None:
    """Write UTF-8 text to ``path`` atomically (see `atomic_path`, ``durable`` too)."""
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def fsync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (renames into it) to the disk, where the file system can."""
    _fsync(Path(folder))


__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_folder", "make_folder", "temp_path"]


def progress_bar(iterable=None, desc: str = "", disable: bool = False, total: int | None = None, initial: int = 0):
    """A progress bar (tqdm, on stderr) over ``iterable``: redrawn as it goes on a terminal, every 30 s into a log
    file (a training's, redrawn at every step, filled 30 KB of log in 200 steps); `postfix` sets its figures
    without a redraw."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, disable=disable, total=total, initial=initial,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def postfix(bar, **figures) -> None:
    """Show ``figures`` beside the bar at its next redraw (not a redraw of their own)."""
    bar.set_postfix(refresh=False, **figures)
