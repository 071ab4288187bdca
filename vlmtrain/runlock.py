"""One writer per output directory: an OS lock on ``DIR/.lock`` that the kernel releases when its holder dies.

``fcntl.flock`` locks belong to the open file, so a killed writer (even ``kill -9``) leaves no stale lock
behind, and a second writer fails at once instead of waiting. The file also names the holder's pid
and command for the error message. The lock file itself is never deleted: a writer that unlinked it
could race a newcomer that had just opened the old one. Standard library only (and our error types): both the trainer and
the curation tools take this lock before writing anything.
"""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from vlmtrain.errors import UserError

LOCK_FILE = ".lock"


class DirectoryLockedError(UserError):
    """Another live process is writing the same output directory; the message names its pid."""


class RunLock:
    """``with RunLock(out_dir):`` holds ``out_dir`` (created if missing) for this process."""

    def __init__(self, directory: str | Path, what: str | None = None):
        self.directory = Path(directory)
        self.what = what or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]
        self._fd: int | None = None

    def acquire(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "pid unknown (it is starting)"
            os.close(fd)
            raise DirectoryLockedError(f"{self.directory} is being written by another process ({holder}); wait "
                                       f"for it to finish or use another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {self.what}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # while still locked: a later reader never sees a stale pid
            os.close(self._fd)  # closing the only descriptor releases the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
