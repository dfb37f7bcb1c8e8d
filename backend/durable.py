"""Small helpers for files that must survive a crash: directory fsync, atomic and secret (0600) file writes, quiet clean-up."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable (POSIX: the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(*paths: Path) -> None:
    """Remove files that may or may not exist (clean-up after a failed write)."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def write_secret(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write a secret (private key, password): 0600 from creation, never half-written (see ``write_atomic``).

    With ``replace`` false an existing ``path`` is never overwritten (FileExistsError).
    """
    write_atomic(path, data, 0o600, replace=replace)


def write_atomic(path: Path, data: bytes, mode: int, *, replace: bool = True) -> None:
    """Write ``path`` so that after a crash it holds the old content (or nothing) or the whole new one.

    The data goes to a temporary file in the same directory, created with ``mode`` (O_EXCL:
    nobody else's file; fchmod: the umask cannot change the mode, so a secret is never readable
    by others, not even for a moment), fsynced, then put in place in one step and the directory
    fsynced. Without ``replace`` an existing ``path`` raises FileExistsError: link(2) fails on an
    existing name, where rename(2) would silently replace it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o600)  # owner-only until fchmod
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        unlink_quietly(tmp)
        raise
    fsync_dir(path.parent)
