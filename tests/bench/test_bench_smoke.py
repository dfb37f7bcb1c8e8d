"""Smoke runs of the issue-17 benchmarks at a tiny size (B7 queue growth, B8 connection flood): each runs
to the end on loopback, stops by itself, and writes the figures the report reads."""

from __future__ import annotations

import json

import pytest

from tests.bench import flood_bench, queue_growth_bench
from tests.conftest import require_tool

pytestmark = pytest.mark.slow


def test_queue_growth_runs_and_its_runner_queries_scan_nothing(tmp_path):
    require_tool("/usr/sbin/smtp-source")
    out = tmp_path / "growth.json"
    assert queue_growth_bench.main(["--sizes", "0,500", "--messages", "20", "--idle", "0.5", "--pokes", "2",
                                    "--json", str(out)]) == 0
    sizes = json.loads(out.read_text())["sizes"]
    assert [s["backlog"] for s in sizes] == [0, 500]
    for s in sizes:
        assert s["accepts_per_s_20"] > 0 and s["first_delivery_ms"] > 0 and s["rss_mib"] > 10
        assert s["queue_show_s"] is not None and s["queue_list_s"] is not None
        assert not [q for q in s["full_scans"] if "next_attempt" in q], s["full_scans"]
    assert sizes[1]["db_mib"] > sizes[0]["db_mib"]  # the backlog really was there


def test_seeding_puts_deferred_rows_in_the_future(tmp_path):
    from backend.queue.store import Queue

    db = tmp_path / "queue.db"
    queue_growth_bench.seed(db, 1000)
    q = Queue(db, group_commit=False)
    try:
        counts, _ = q.stats()
        assert counts["deferred"] == 1000
        assert q.claim_due(10, lambda a: 60.0) == []  # nothing of the backlog is due
        assert len(q.get("SEED000000000999").recipients) == 1
    finally:
        q.close()


def test_flood_holds_every_connection_and_serves_the_trickle(tmp_path):
    require_tool("haproxy")
    out = tmp_path / "flood.json"
    assert flood_bench.main(["--flood", "200", "--trickle", "10", "--rate", "50", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    for name in ("homemx-gateway", "haproxy"):
        p = r[name]
        assert p["connected"] == 200 and p["held_sessions"] >= 198, p
        assert p["quiet"]["failures"] == 0 and p["flood"]["failures"] == 0 and p["burst"]["failures"] == 0, p
        assert p["flood"]["n"] == 10 and p["flood"]["p99_ms"] > 0
