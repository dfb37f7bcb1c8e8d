"""backend/durable.py: secret files are 0600 from creation, whole or absent, and never clobbered by accident; large files start their writeback as they are written."""

from __future__ import annotations

import ctypes
import os
import stat

import pytest

from backend import durable
from backend.durable import WRITEBACK_SLICE, write_secret, write_with_writeback


def test_secret_is_0600_whatever_the_umask_and_leaves_no_temporary(tmp_path):
    for umask in (0o000, 0o277):  # a lax umask cannot widen it, a strict one cannot lock us out
        old = os.umask(umask)
        try:
            write_secret(tmp_path / f"key{umask}", b"secret\n")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / f"key{umask}").stat().st_mode) == 0o600
        assert (tmp_path / f"key{umask}").read_bytes() == b"secret\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key0", f"key{0o277}"]


def test_existing_secret_is_kept_unless_replace(tmp_path):
    p = tmp_path / "key"
    write_secret(p, b"old")
    with pytest.raises(FileExistsError):
        write_secret(p, b"new")
    assert p.read_bytes() == b"old"
    write_secret(p, b"new", replace=True)
    assert p.read_bytes() == b"new" and stat.S_IMODE(p.stat().st_mode) == 0o600
    assert [q.name for q in tmp_path.iterdir()] == ["key"]


@pytest.mark.parametrize("size", [0, 1, WRITEBACK_SLICE - 1, WRITEBACK_SLICE, WRITEBACK_SLICE + 1, 3 * WRITEBACK_SLICE + 7])
def test_write_with_writeback_writes_exactly_and_starts_writeback_per_slice(tmp_path, monkeypatch, size):
    # Large spool and Maildir files start their writeback slice by slice, so a later fsync (theirs,
    # or the queue's next commit, which on ext4 waits for their data) is short (B6). The ranges
    # asked for cover what was written, in order, each at most a slice; the bytes are exact.
    calls = []
    real = durable._sync_file_range
    assert real is not None, "sync_file_range(2) not found in libc: large files would not start writeback early"

    def spy(fd, offset, count, flags):
        calls.append((offset, count, flags))
        result = real(fd, offset, count, flags)
        assert result == 0, os.strerror(ctypes.get_errno())
        return result

    monkeypatch.setattr(durable, "_sync_file_range", spy)
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        head = b"prefix\n"
        assert write_with_writeback(fd, head) == len(head)
        assert write_with_writeback(fd, memoryview(data), len(head)) == size
    finally:
        os.close(fd)
    assert path.read_bytes() == head + data
    assert calls[0] == (0, len(head), durable.SYNC_FILE_RANGE_WRITE)
    covered = len(head)
    for offset, count, flags in calls[1:]:
        assert offset == covered and 0 < count <= WRITEBACK_SLICE and flags == durable.SYNC_FILE_RANGE_WRITE
        covered += count
    assert covered == len(head) + size
