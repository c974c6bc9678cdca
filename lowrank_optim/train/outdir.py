"""A run's output folder: one writer at a time, no temporary files left by killed saves, a metrics file
that is never written through a link.

* **One writer per ``--out``**: a run holds an exclusive ``flock`` on ``DIR/.lock`` for its whole life (rank
  0 under torchrun), and writes who holds it there (process id, host, start time). A second run on the
  same folder, with or without ``--resume`` or ``--overwrite``, is refused in one line naming the holder,
  before it reads or deletes anything. The kernel drops the lock when the holder ends, however it ends
  (SIGKILL included), so a crashed run never leaves a stale lock. ``flock`` is advisory and local to one
  machine's kernel; on NFS, Linux maps it to NFS byte-range locks, which need a lock manager (NFSv4, or
  lockd for v3). Where ``fcntl`` does not exist (Windows) no lock is taken.
* **Temporary files of killed saves** (``.checkpoint.pt.*.tmp``, ``.checkpoint.dcp.*.tmp/``,
  ``.metrics.jsonl.*.tmp``: what a save or a metrics rewrite killed midway leaves) are removed by the next
  run once it holds the lock, when no save can be in progress.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from .errors import TrainError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
TEMPORARIES = (".checkpoint.pt.*.tmp", ".checkpoint.dcp.*.tmp", ".metrics.jsonl.*.tmp")


def prepare(out: Path) -> None:
    """Create ``out`` if needed and check that this process can write there (TrainError if not)."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise TrainError(f"cannot write to --out {str(out)!r}: {err.strerror or err}") from None


class OutLock:
    """The exclusive lock of one run on its output folder (see the module doc)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _holder(fd)
                os.close(fd)
                raise TrainError(f"--out {str(self.path.parent)!r} is in use by another run ({holder}); wait for "
                                 "it to end or stop it, or choose another --out") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed this file as it ended: lock the one now in its place
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_me()).encode() + b"\n")
        self.fd = fd

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                           0o644)
        except OSError as err:
            raise TrainError(f"cannot lock --out {str(self.path.parent)!r}: {self.path.name}: "
                             f"{err.strerror or err} (remove it if it is a link)") from None

    def release(self) -> None:
        """Remove the lock file, then drop the lock (a run that locked the removed file sees it is gone
        and locks the new one, see :meth:`acquire`)."""
        if self.fd is not None:
            with suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300]}


#: What a refused run reports of a holder whose name is not in the lock file.
NO_NAME = "a process that has not written its name yet"
#: How long a refused run waits for the holder to write its name: the holder writes it right after it takes
#: the lock, so a run started at the same moment can find the file locked and still empty.
NAME_WAIT_S = 2.0


def _holder(fd: int) -> str:
    """:func:`_read`, waiting up to :data:`NAME_WAIT_S` for a holder that has just taken the lock."""
    deadline = time.monotonic() + NAME_WAIT_S
    while True:
        holder = _read(fd)
        if holder != NO_NAME or time.monotonic() >= deadline:
            return holder
        time.sleep(0.02)


def _read(fd: int) -> str:
    """Who holds the lock, from what it wrote in the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return NO_NAME
    return f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}"


def remove_temporaries(out: Path) -> tuple[int, int]:
    """Delete what killed saves left in ``out``; returns (entries, bytes) removed. Call with the lock held."""
    count = size = 0
    for pattern in TEMPORARIES:
        for path in out.glob(pattern):
            if path.is_symlink() or path.is_file():
                size += path.lstat().st_size
                with suppress(OSError):
                    path.unlink()
            elif path.is_dir():
                size += sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
                shutil.rmtree(path, ignore_errors=True)
            count += 1
    return count, size


def create_empty(path: Path) -> None:
    """An empty regular file at ``path``: an existing file or link there is removed first (a link's target
    is never truncated), and the new file is created exclusively, not through a link."""
    with suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            raise TrainError(f"{str(path)!r} is a folder; remove it")
        path.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        os.close(os.open(path, flags, 0o666))
    except OSError as err:
        raise TrainError(f"cannot create {str(path)!r}: {err.strerror or err}") from None


__all__ = ["LOCK_NAME", "OutLock", "create_empty", "prepare", "remove_temporaries"]
