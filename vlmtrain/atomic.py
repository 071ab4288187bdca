"""Crash-safe file replacement: write a temp file, fsync it, rename it over the target, fsync the directory.

A reader (or a rerun after a crash or power loss) sees the old file or the new one, never a torn one.
Temp names are unique per writer (pid + random suffix), so two processes never write into the same temp
file; the writer creates the temp file itself, so it gets the usual permissions (umask), unlike mkstemp's 0600.
Standard library only.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write to; when the block ends without error it becomes
    ``path`` (durably), otherwise it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's fsync makes the renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def naming_full_disk(path: str | Path) -> Iterator[None]:
    """A full disk (or quota) while the block writes ``path`` raises ``OSError(ENOSPC)`` naming ``path``.

    Python's own writes report ENOSPC without a file name; torch.save and safetensors report it as a
    RuntimeError or their own error, so after those a small probe write tells whether the disk is full.
    """
    try:
        yield
    except OSError as err:
        if err.errno in NO_SPACE and not err.filename:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except Exception as err:
        probe = Path(path) if Path(path).is_dir() else Path(path).parent
        probe = probe / f".space-probe.{os.getpid()}"
        try:
            with open(probe, "wb") as handle:
                handle.write(bytes(1 << 20))
        except OSError as full:
            if full.errno in NO_SPACE:
                raise OSError(full.errno, full.strerror, str(path)) from err
        finally:
            probe.unlink(missing_ok=True)
        raise
