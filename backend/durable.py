"""Small helpers for files that must survive a crash: directory fsync, atomic and secret (0600) file writes, quiet clean-up."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable (POSIX: the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITEBACK_SLICE = 1 << 20
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, do not wait


def _load_sync_file_range():
    """libc's sync_file_range(2) (Linux; Python's os module does not offer it), or None."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range() if sys.platform.startswith("linux") else None


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing ``count`` octets of ``fd`` from ``offset`` to disk and return
    at once (sync_file_range with SYNC_FILE_RANGE_WRITE); a no-op where it does not exist. An
    error is not the caller's concern: the fsync that must follow reports any."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, count, SYNC_FILE_RANGE_WRITE)


def write_with_writeback(fd: int, data, offset: int = 0) -> int:
    """Write ``data`` (bytes-like) to ``fd`` at ``offset`` in 1 MiB slices, starting the kernel's
    writeback of each slice at once (sync_file_range, not waiting for it); returns the octets
    written. The caller still fsyncs; this only makes that fsync short.

    Why: ext4 (data=ordered) commits its journal for every fsync on the disk, and a commit first
    writes the data of every file whose blocks it allocates. A 25 MB file left dirty until its own
    fsync made the queue's next commit, a 5 KB message's, wait for those 25 MB (tens of ms,
    docs/benchmarks.md B6). Started slice by slice, little is left to wait for at any moment."""
    view = memoryview(data)
    written = 0
    for pos in range(0, len(view), WRITEBACK_SLICE):
        begin = offset + written
        written += write_all(fd, view[pos : pos + WRITEBACK_SLICE])
        start_writeback(fd, begin, offset + written - begin)
    return written


def write_all(fd: int, data) -> int:
    """os.write until all of ``data`` (bytes-like) is written; returns its length."""
    part = memoryview(data)
    while part:
        part = part[os.write(fd, part):]
    return len(data)


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
