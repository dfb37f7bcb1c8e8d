"""Free space of the queue's and the Maildirs' filesystems in the backend's Prometheus text (HomemxDiskAlmostFull reads it)."""

from __future__ import annotations

import os

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backend.metrics import BackendMetrics


def samples(metrics: BackendMetrics) -> dict[tuple[str, str], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, s.labels["path"]): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("homemx_backend_disk_")}


def test_free_space_of_each_path_and_of_a_maildir_root_not_made_yet(tmp_path):
    m = BackendMetrics()
    m.watch_disks({"queue": tmp_path, "maildir": tmp_path / "mail" / "not-yet"})
    got = samples(m)
    st = os.statvfs(tmp_path)
    assert set(got) == {(n, p) for n in ("homemx_backend_disk_free_bytes", "homemx_backend_disk_free_ratio")
                        for p in ("queue", "maildir")}
    for path in ("queue", "maildir"):  # the missing directory is measured where it will be made
        assert got["homemx_backend_disk_free_ratio", path] == pytest.approx(st.f_bavail / st.f_blocks, abs=0.01)
        assert got["homemx_backend_disk_free_bytes", path] == pytest.approx(st.f_bavail * st.f_frsize, rel=0.01)
        assert 0 < got["homemx_backend_disk_free_ratio", path] <= 1
