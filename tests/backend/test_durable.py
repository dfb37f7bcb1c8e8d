"""backend/durable.py: secret files are 0600 from creation, whole or absent, and never clobbered by accident."""

from __future__ import annotations

import os
import stat

import pytest

from backend.durable import write_secret


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
