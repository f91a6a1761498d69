"""Where a command's files go, so that runs never lose or delete each other's files.

* The default folder of `trace` is ``traces/<slug>-<hash>``: the hash (8 hex digits of SHA-256) covers the
  prompt, the model and every setting that changes the graph, so two different traces never share a folder.
* `RunFolder`: a run writes into its own temporary folder ``<out>/.run-<pid>-<random>``, then moves its files
  into ``<out>`` with one rename each, holding a lock on ``<out>`` (``flock``) so two runs' sets of files are
  never interleaved.  On every exit (error, Ctrl-C, SIGTERM) the temporary folder is removed, and so is
  ``<out>`` if this run created it and left it empty.  The moves happen with Ctrl-C, SIGTERM and SIGHUP held
  back (delivered once they are done), and any error among them puts every old file back.  SIGKILL runs no
  cleanup: the next run into the same folder finishes a commit a dead process began (its private folder holds the
  list, ``.commit``, written once every file was complete), so the folder holds the whole new set, never a mix;
  then it removes what dead processes left (temporary folders and ``.NAME.tmp<pid>`` files whose pid is gone).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from replacement.checkpoint import signals_held
from replacement.errors import BadInputError
from replacement.io import process_alive, remove_leftovers

from .common import refuse_file


def default_out_dir(prompt: str, model: str, settings: dict, root: str | Path = "traces") -> Path:
    """``root/<slug of the prompt>-<short hash of prompt, model and settings>``."""
    from graphs.export import prompt_slug

    key = json.dumps({"prompt": prompt, "model": model, "settings": settings}, sort_keys=True, default=str)
    return Path(root) / f"{prompt_slug(prompt)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class RunFolder:
    """``with RunFolder(out) as run:`` (or ``run = RunFolder(out).open()`` ... ``run.close()``) write to
    ``run.path(name)``, then ``run.commit([names])``."""

    def __init__(self, out: str | Path, flag: str = "--out"):
        self.out, self.flag = Path(out), flag
        self.tmp: Path | None = None
        self.created: list[Path] = []

    def __enter__(self) -> "RunFolder":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> "RunFolder":
        """Create the output and the private folder (BadInputError if it cannot be written)."""
        refuse_file(self.flag, str(self.out))  # mkdir would say only "File exists"
        missing = [p for p in [self.out, *self.out.parents] if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.created = missing  # deepest first
            finish_dead_commits(self.out)
            remove_leftovers(self.out)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".run-{os.getpid()}-", dir=self.out))
        except OSError as e:
            self.close()
            raise BadInputError(f"cannot write to {self.flag} {self.out}: {e.strerror or e}") from None
        return self

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self, names: list[str]) -> list[Path]:
        """Move the named files into the output folder (under its lock), all or none: each file already there is
        first moved aside into the private folder, and if any move fails every file is put back as it was (a
        failed run changes nothing); Ctrl-C, SIGTERM and SIGHUP wait until the moves are done, and a SIGKILL
        among them leaves the next run to finish them (`finish_dead_commits`).  A folder in the way is refused.
        Returns the final paths."""
        for name in names:
            dest = self.out / name
            if dest.is_dir() and not dest.is_symlink():
                raise BadInputError(f"{dest} is a folder, where this run writes a file; move it away")
        fd = os.open(self.out, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            (self.tmp / COMMIT_LIST).write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
            done: list[tuple[Path, Path | None]] = []  # (destination, where its old file went)
            with signals_held():
                try:
                    for name in names:
                        dest, old = self.out / name, self.tmp / f".old-{name}"
                        had = os.path.lexists(dest)
                        if had:
                            os.replace(dest, old)
                        done.append((dest, old if had else None))
                        os.replace(self.tmp / name, dest)
                except BaseException:
                    for dest, old in reversed(done):
                        with contextlib.suppress(OSError):
                            if old is not None:
                                os.replace(old, dest)
                            else:
                                dest.unlink(missing_ok=True)
                    raise
                finally:
                    (self.tmp / COMMIT_LIST).unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the lock
        return [self.out / name for name in names]

    def close(self) -> None:
        """Remove the private folder, and the folders this run created if they are empty."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        for folder in self.created:  # what this run created, if it is still empty
            try:
                folder.rmdir()
            except OSError:
                break


COMMIT_LIST = ".commit"  # in a run's private folder while its files move in: their names, one a line


def finish_dead_commits(out: Path) -> None:
    """Finish the commits that processes killed among their moves left half done in ``out`` (kill -9 runs no
    cleanup): each file of the list still in the dead run's private folder is moved in, so ``out`` holds that
    run's whole set rather than a mix of two runs' files.  Under ``out``'s lock, as a commit is; a live run's
    folder is left alone (its pid is alive)."""
    dead = [run for run in out.glob(".run-*") if (run / COMMIT_LIST).is_file()
            and (m := re.match(r"\.run-(\d+)-", run.name)) and not process_alive(int(m.group(1)))]
    if not dead:
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for run in dead:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                for name in (run / COMMIT_LIST).read_text(encoding="utf-8").splitlines():
                    if name and "/" not in name and (run / name).is_file():
                        os.replace(run / name, out / name)
                (run / COMMIT_LIST).unlink()
    finally:
        os.close(fd)
