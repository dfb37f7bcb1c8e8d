"""The runner's queue queries stay cheap however long the queue grows (issue 17, B7): their SQLite plans
search an index and, for the local-only round (delivery paused or absent), need no sort.

Before the recipient_local_due index, ``next_due_time(local=True)`` read every queued and deferred
recipient's row and sorted them all (5.9 s per runner round with 1M deferred messages, each commit of
local mail waking the runner)."""

from __future__ import annotations

import time

from backend.queue.model import NewMessage, NewRecipient
from backend.queue.store import Queue
from tests.bench.queue_growth_bench import seed


def _plans(q: Queue, calls) -> dict[str, list[str]]:
    """The plans of the due-recipient SELECTs (ordered by next attempt) that ``calls`` run."""
    conn = q._conn()
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    try:
        for call in calls:
            call()
    finally:
        conn.set_trace_callback(None)
    return {sql: [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
            for sql in seen if sql.lstrip().startswith("SELECT") and "ORDER BY r.next_attempt" in sql
            or "ORDER BY next_attempt" in sql}


def _queue(tmp_path) -> Queue:
    q = Queue(tmp_path / "queue.db", group_commit=False)
    q.enqueue(NewMessage("a@example.org", (NewRecipient("b@example.org", "b@example.org", True),
                                           NewRecipient("c@remote.test", "c@remote.test", False)), b"x", "lan"))
    return q


def test_local_only_round_searches_an_index_without_sorting(tmp_path):
    q = _queue(tmp_path)
    try:
        plans = _plans(q, [lambda: q.next_due_time(True, frozenset()),
                           lambda: q.claim_due(10, lambda a: 60.0, True, frozenset())])
    finally:
        q.close()
    assert len(plans) == 2, plans
    for sql, plan in plans.items():
        assert any(p.startswith("SEARCH") and "recipient_local_due" in p for p in plan), (sql, plan)
        assert not any(p.startswith("SCAN") or "TEMP B-TREE" in p for p in plan), (sql, plan)


def test_every_round_searches_an_index(tmp_path):
    q = _queue(tmp_path)
    try:
        plans = _plans(q, [lambda: q.next_due_time(None, frozenset()),
                           lambda: q.claim_due(10, lambda a: 60.0, None, frozenset())])
    finally:
        q.close()
    for sql, plan in plans.items():
        assert plan[0].startswith("SEARCH") and "INDEX" in plan[0], (sql, plan)
        assert not any(p.startswith("SCAN") for p in plan), (sql, plan)


def test_local_round_with_a_large_remote_backlog_is_fast(tmp_path):
    """The outcome the plan is for: 50k deferred remote messages, and a local-only round still answers
    in milliseconds (it took ~200 ms before the index, growing with the backlog)."""
    db = tmp_path / "queue.db"
    seed(db, 50_000)
    q = Queue(db, group_commit=False)
    try:
        q.next_due_time(True, frozenset())  # pages in
        t0 = time.perf_counter()
        for _ in range(5):
            assert q.next_due_time(True, frozenset()) is None
        assert (time.perf_counter() - t0) / 5 < 0.02
    finally:
        q.close()
