"""Real storage faults for tests: a small tmpfs the test mounts (root) and always unmounts, filled to ENOSPC on demand."""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
from pathlib import Path

from tests.conftest import require_root, require_tool


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "1m"):
    """Mount a ``size`` tmpfs on ``path`` (created if needed) for the block: a disk that really fills up."""
    require_root()
    require_tool("mount", "umount")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        gc.collect()  # SQLite connections of finished threads close with their objects
        # Lazy: a descriptor some thread still holds must never leave the mount behind on the host.
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write ``directory/name`` until the filesystem is full (ENOSPC); returns the file (unlink it to free the space)."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):  # big writes, then the last few bytes
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return path
