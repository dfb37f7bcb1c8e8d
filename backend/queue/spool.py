"""Large message bodies, each in its own fsynced file under spool/, beside the queue database.

Above SPOOL_THRESHOLD a body is written to spool/<queue id> (write, fsync, rename, directory fsync)
by the session's worker thread, and only the record goes through the group commit. Otherwise a
small message's commit would wait behind 25 MB of WAL writes from a neighbour (docs/benchmarks.md,
B6). The record is committed only after the file is durable; a crash in between leaves an orphan
file that ``remove_orphans`` deletes at the next start. All functions block.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from backend.durable import fsync_dir, unlink_quietly, write_with_writeback

SPOOL_THRESHOLD = 256 * 1024


def write_durably(spool_dir: Path, name: str, content: bytes) -> None:
    """Make ``content`` durable as spool_dir/name: when this returns, the file survives power loss."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    final = spool_dir / name
    tmp = spool_dir / f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            write_with_writeback(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        fsync_dir(spool_dir)
    except BaseException:
        unlink_quietly(tmp, final)
        raise


def read(spool_dir: Path, name: str) -> bytes:
    return (spool_dir / name).read_bytes()


def remove_orphans(spool_dir: Path, known: set[str]) -> int:
    """Delete the files of spool_dir whose name is not in ``known``; returns how many."""
    if not spool_dir.exists():
        return 0
    removed = 0
    for name in os.listdir(spool_dir):
        if name not in known:
            os.unlink(spool_dir / name)
            removed += 1
    return removed


def unlink(spool_dir: Path, names: Iterable[str | None]) -> None:
    """Remove the files of deleted messages (None: the message had no spool file)."""
    unlink_quietly(*(spool_dir / n for n in names if n))
