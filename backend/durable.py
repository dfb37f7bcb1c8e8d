"""Small helpers for writing files that must survive a crash: directory fsync, quiet clean-up."""

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
