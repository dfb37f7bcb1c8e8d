"""Durable mail queue on SQLite: enqueue through the group-commit writer, per-recipient state,
scheduling (claim before attempt, expiry), outcomes with their DSNs in one commit, and the
postsuper-like admin operations. The layout and its migrations are in backend/queue/schema.py, the
writer thread in backend/queue/writer.py, large bodies in backend/queue/spool.py.

Every method is blocking; the daemon calls them from worker threads, never on the event loop.
The queue CLI opens the same database from another process while the daemon runs (WAL allows
readers beside the writer; writers wait on ``busy_timeout``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from backend.http import webhooks
from backend.queue import reads, schema, spool
from backend.queue.model import (
    QUEUED, STATES, NewMessage, QueueEntry, QueueError, Recipient, new_queue_id,
)
from backend.queue.writer import GroupCommitWriter, QueueClosed

log = logging.getLogger("homemx.queue")

# What a commit brought, passed to ``on_enqueued``: work only remote delivery can take (a runner
# whose remote delivery is paused need not look), or anything else (local recipients, a retry).
NEW_REMOTE = "remote"
NEW_WORK = "any"


class Queue:
    """The queue, stored in SQLite. Thread-safe; all methods block (call them from worker threads).

    What any store of the queue must provide (a PostgreSQL one would be a sibling class with the
    same methods and the records of backend/queue/model.py):
    - receiving: ``spool_large`` (make a large body durable first), ``enqueue`` (blocking) and
      ``submit`` (a future), both durable before they return a queue id, ``on_enqueued(what)``
      called after a commit that brought new work (NEW_REMOTE or NEW_WORK);
    - delivery: ``claim_due`` (plans the next attempt *before* the attempt), ``next_due_time``,
      ``content``, ``record_outcomes`` (outcomes and their DSNs in one commit), ``set_result``,
      ``mark_delay_dsn_sent``;
    - admin and monitoring: ``get``, ``list``, ``stats``, ``retry``, ``hold``, ``release``,
      ``delete``, ``purge_final``;
    - lifetime: ``remove_orphans`` (at start), ``close``, ``healthy``, ``failure``.
    Errors: QueueError (unknown id, ...), QueueClosed (no more writes: sessions answer 451).
    """

    SPOOL_THRESHOLD = spool.SPOOL_THRESHOLD

    def __init__(
        self,
        path: str | Path,
        now: Callable[[], float] = time.time,
        group_commit: bool = True,
        max_age: float | None = None,
    ):
        self.path = Path(path)
        self.now = now
        # RFC 5321 4.5.4.1: give up after a few days. No next attempt is planned past a message's
        # expiry (created + max_age), so its last attempt and its bounce come at its max age, not
        # at the next step of the retry schedule (up to 8 h later). None: no limit.
        self.max_age = max_age
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.spool_dir = self.path.parent / "spool"
        with self._conn() as conn:
            schema.migrate(conn)
        self._closed = False
        # Listeners get told when new work is queued (the runner wakes up instead of polling).
        self.on_enqueued: Callable[[str], None] | None = None
        # ... and when outcomes brought webhook events (backend/http/webhooks.py WebhookSender).
        self.on_webhook_events: Callable[[], None] | None = None
        # Without group commit (tests, the CLI), each write is its own transaction on the caller's thread.
        self._writer = GroupCommitWriter(self._run_ops, self._notify) if group_commit else None

    # -- connections ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = schema.connect(self.path)
        return conn

    def _drop_conn(self) -> None:
        """Forget this thread's connection (after a ROLLBACK failed, its state is unknown)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def close(self) -> None:
        """Let the writer finish what was submitted, then stop it. Later writes raise QueueClosed."""
        self._closed = True
        if self._writer is not None:
            self._writer.close()

    def healthy(self) -> bool:
        """False once the writer thread has died: nothing can be stored any more (the daemon's
        watchdog then stops it so that systemd restarts it)."""
        if self._writer is None:
            return not self._closed
        return self._writer.healthy()

    @property
    def failure(self) -> BaseException | None:
        """What killed the writer thread, if anything did."""
        return None if self._writer is None else self._writer.failure

    # -- writes ---------------------------------------------------------------------------------

    def _write(self, op: Callable[[sqlite3.Connection, float], object], notify: str | None = None) -> object:
        if self._writer is None:
            if self._closed:
                raise QueueClosed("the queue is closed")
            result = self._run_ops([op])[0]
            if notify:
                self._notify(notify)
            return result
        return self._writer.submit(op, notify).result()

    def _run_ops(self, ops: list) -> list:
        conn = self._conn()
        now = self.now()
        with self._transaction(conn):
            return [op(conn, now) for op in ops]

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            # SQLite ends the transaction itself on some errors (SQLITE_FULL, an I/O error at
            # COMMIT): a ROLLBACK then fails with "cannot rollback - no transaction is active", and
            # raising that would hide the real cause ("database or disk is full").
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as e:
                    log.warning("rollback failed (%s); reopening the queue database", e)
                    self._drop_conn()
            raise

    def enqueue(self, msg: NewMessage) -> str:
        """Store a message durably and return its queue id. Returns only after the fsync."""
        return self._write(self._insert_op(msg), notify=_new_work(msg))  # type: ignore[return-value]

    def submit(self, msg: NewMessage) -> concurrent.futures.Future:
        """Hand a message to the group-commit writer without blocking; the future's result is the
        queue id, set once the message is durable (asyncio callers await ``asyncio.wrap_future``)."""
        if self._writer is None:
            raise RuntimeError("submit() needs the group-commit writer")
        return self._writer.submit(self._insert_op(msg), notify=_new_work(msg))

    @staticmethod
    def _insert_op(msg: NewMessage) -> Callable[[sqlite3.Connection, float], str]:
        def insert(conn: sqlite3.Connection, now: float) -> str:
            qid = msg.id or new_queue_id(now)
            conn.execute(
                "INSERT INTO message (id, created, sender, listener, client_addr, auth_user, size, content, spool,"
                " folder, api_key) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (qid, now, msg.sender, msg.listener, msg.client_addr, msg.auth_user, len(msg.content),
                 b"" if msg.spool else msg.content, msg.spool, msg.folder, msg.api_key),
            )
            conn.executemany(
                "INSERT INTO recipient (message_id, address, orig_address, domain, local, state,"
                " next_attempt, updated) VALUES (?,?,?,?,?,?,?,?)",
                [
                    (qid, r.address, r.orig_address, r.address.rpartition("@")[2].lower(), int(r.local), QUEUED, now, now)
                    for r in msg.recipients
                ],
            )
            return qid

        return insert

    # -- scheduling ----------------------------------------------------------------------------

    def claim_due(
        self,
        limit: int,
        retry_delay: Callable[[int], float],
        local: bool | None = None,
        exclude: frozenset[int] = frozenset(),
    ) -> list[Recipient]:
        """Pick up to ``limit`` recipients whose next attempt is due, and move their next attempt
        forward *before* the attempt is made, so a crash mid-delivery never re-hammers the
        destination on restart (mox does the same). ``retry_delay(attempts_so_far)`` gives the
        back-off. ``exclude``: recipient ids whose attempt is still under way (never claimed twice).
        Returns the claimed recipients with their attempt count already incremented. The planned
        next attempt is capped at the message's expiry (see ``max_age``)."""
        where = "r.state IN ('queued','deferred') AND r.next_attempt <= ?"
        if local is not None:
            where += f" AND r.local = {int(bool(local))}"

        def claim(conn: sqlite3.Connection, now: float) -> list[int]:
            rows = conn.execute(
                f"SELECT r.id, r.attempts, m.created FROM recipient r JOIN message m ON m.id = r.message_id"
                f" WHERE {where} ORDER BY r.next_attempt LIMIT ?",
                (now, limit + len(exclude)),
            ).fetchall()
            rows = [r for r in rows if r[0] not in exclude][:limit]
            conn.executemany(
                "UPDATE recipient SET attempts = attempts + 1, last_attempt = ?, next_attempt = ?, updated = ?"
                " WHERE id = ?",
                [(now, self._capped(now + retry_delay(attempts), created, now), now, rid)
                 for rid, attempts, created in rows],
            )
            return [rid for rid, _, _ in rows]

        ids = self._write(claim)
        return reads.recipients_by_ids(self._conn(), ids)  # type: ignore[arg-type]

    def _capped(self, next_attempt: float, created: float, now: float) -> float:
        """``next_attempt``, or the message's expiry when that comes first. Once expired, the
        planned retry stands: the attempt under way bounces it (a crash meanwhile must not turn
        the retry into an immediate loop). "Expired" is judged exactly as ``delivery.expired``
        judges it (age >= max_age), so the attempt made at the expiry is the one that bounces."""
        if self.max_age is None or now - created >= self.max_age:
            return next_attempt
        return min(next_attempt, created + self.max_age)

    def next_due_time(self, local: bool | None = None, exclude: Iterable[int] = ()) -> float | None:
        """When the earliest active recipient is due (None: nothing active), counting only those
        ``claim_due`` with the same ``local`` and ``exclude`` could pick: a recipient whose
        attempt is still running, or a remote one while remote delivery is paused, is overdue
        without being claimable, and waiting on it would make the runner spin."""
        sql = "SELECT id, next_attempt FROM recipient WHERE state IN ('queued','deferred')"
        if local is not None:
            sql += f" AND local = {int(bool(local))}"
        excluded = frozenset(exclude)
        # Filtered here as in claim_due (a NOT IN list would hit SQLite's parameter limit).
        rows = self._conn().execute(sql + " ORDER BY next_attempt LIMIT ?", (len(excluded) + 1,))
        return next((due for rid, due in rows if rid not in excluded), None)

    def set_result(self, rcpt_id: int, state: str, reply: str | None, next_attempt: float | None = None) -> None:
        """Record the outcome of an attempt: delivered, deferred (with its next attempt, capped at
        the message's expiry) or bounced."""
        self.record_outcomes([(rcpt_id, state, reply, next_attempt)])

    def record_outcomes(
        self,
        outcomes: Iterable[tuple[int, str, str | None, float | None]],
        dsns: Iterable[NewMessage] = (),
        delay_dsn_for: str | None = None,
    ) -> list[str]:
        """Record the outcomes of one delivery round and queue its reports in ONE commit.

        ``outcomes``: (recipient id, state, last reply, next attempt or None) per recipient, as
        ``set_result`` takes them (a held recipient keeps its state; a next attempt later than the
        message's expiry is moved to the expiry, see ``max_age``). ``dsns``: reports to queue
        (failed and/or delayed DSNs, from ``<>``). ``delay_dsn_for``: a message id whose "delay
        notice sent" flag is set in the same commit (the delayed DSN among ``dsns``).

        Either everything is durable when this returns, or nothing is (it raises): a crash can
        never leave a recipient bounced without its DSN queued, nor a delay notice marked sent
        without the notice (issue 11 point 2). The webhook events of messages sent through an API
        key (delivered, deferred, bounced: backend/http/webhooks.py) are written in the same commit,
        so no outcome is ever recorded without its event. It is one group-commit operation, so it
        batches with other writes like any of them. Returns the queue ids of ``dsns``, in order.
        """
        rows = list(outcomes)
        for _, state, _, _ in rows:
            if state not in STATES:
                raise ValueError(state)
        inserts = [self._insert_op(m) for m in dsns]

        def record(conn: sqlite3.Connection, now: float) -> list[str]:
            planned = []
            for rid, state, reply, nxt in rows:
                if nxt is not None and self.max_age is not None:
                    row = conn.execute(
                        "SELECT m.created FROM recipient r JOIN message m ON m.id = r.message_id WHERE r.id = ?",
                        (rid,),
                    ).fetchone()
                    if row is not None:
                        nxt = self._capped(nxt, row[0], now)
                planned.append((state, reply, nxt, now, rid))
            conn.executemany(
                "UPDATE recipient SET state = ?, last_reply = ?, next_attempt = COALESCE(?, next_attempt),"
                " updated = ? WHERE id = ? AND state != 'held'",
                planned,
            )
            events = webhooks.record_events(conn, now, [(rid, state) for rid, state, _, _ in rows])
            if delay_dsn_for is not None:
                conn.execute("UPDATE message SET delay_dsn_sent = 1 WHERE id = ?", (delay_dsn_for,))
            return [insert(conn, now) for insert in inserts], events

        qids, events = self._write(record, notify=NEW_WORK if inserts else None)  # type: ignore[misc]
        if events and self.on_webhook_events is not None:
            try:
                self.on_webhook_events()
            except Exception:  # noqa: BLE001 - a wake-up must never fail a write
                log.exception("on_webhook_events callback failed")
        return qids

    def content(self, message_id: str) -> bytes:
        row = self._conn().execute("SELECT content, spool FROM message WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise QueueError(f"no message {message_id}")
        if row[1]:
            return spool.read(self.spool_dir, row[1])
        return bytes(row[0])

    # -- spooled bodies --------------------------------------------------------------------------

    def spool_large(self, msg: NewMessage) -> NewMessage:
        """Blocking. For a body above SPOOL_THRESHOLD, make it durable in its own file and return
        the message with ``spool`` set; smaller messages are returned as they are."""
        if len(msg.content) <= self.SPOOL_THRESHOLD or msg.spool:
            return msg
        qid = msg.id or new_queue_id(self.now())
        spool.write_durably(self.spool_dir, qid, msg.content)
        return dataclasses.replace(msg, id=qid, spool=qid)

    def remove_orphans(self) -> int:
        """Delete spool files without a queue record (a crash between the file and the commit).
        Only at daemon start: while sessions run, a file may be durable and its record not yet."""
        known = {row[0] for row in self._conn().execute("SELECT spool FROM message WHERE spool IS NOT NULL")}
        return spool.remove_orphans(self.spool_dir, known)

    def mark_delay_dsn_sent(self, message_id: str) -> None:
        """Remember that the message's one "delayed" notice went out (prefer ``record_outcomes``,
        which does this in the same commit as the notice itself)."""
        self.record_outcomes([], delay_dsn_for=message_id)

    # -- other tables of the queue database ----------------------------------------------------

    def transact(self, op: Callable[[sqlite3.Connection, float], object]) -> object:
        """Run ``op(conn, now)`` in one commit through the writer, like the queue's own writes
        (the webhook events table, backend/http/webhooks.py). Blocking; returns what ``op`` returns."""
        return self._write(op)

    def read(self, op: Callable[[sqlite3.Connection], object]) -> object:
        """Run ``op(conn)`` on this thread's read connection (no transaction opened)."""
        return op(self._conn())

    # -- reading -------------------------------------------------------------------------------

    def get(self, message_id: str) -> QueueEntry:
        entry = reads.entry(self._conn(), message_id)
        if entry is None:
            raise QueueError(f"no message {message_id} in the queue")
        return entry

    def list(self, states: Iterable[str] | None = None) -> list[QueueEntry]:
        """Messages in arrival order; ``states``: only those with a recipient in one of them."""
        return reads.entries(self._conn(), states)

    def stats(self) -> tuple[dict[str, int], float | None]:
        """(recipient count by state, creation time of the oldest message with unfinished recipients)."""
        return reads.stats(self._conn())

    # -- admin (postsuper-like) ----------------------------------------------------------------

    def _ids_for(self, message_id: str | None) -> str:
        if message_id is not None:
            self.get(message_id)  # raises QueueError naming the id
        return message_id or ""

    def retry(self, message_id: str | None = None) -> int:
        """Make queued/deferred recipients due now (all messages, or one). Returns how many."""
        self._ids_for(message_id)
        now = self.now()
        sql = "UPDATE recipient SET next_attempt = ?, updated = ? WHERE state IN ('queued','deferred')"
        args: tuple = (now, now)
        if message_id:
            sql += " AND message_id = ?"
            args += (message_id,)
        cur = self._conn().execute(sql, args)
        self._notify()
        return cur.rowcount

    def hold(self, message_id: str) -> int:
        self._ids_for(message_id)
        now = self.now()
        cur = self._conn().execute(
            "UPDATE recipient SET held_from = state, state = 'held', updated = ?"
            " WHERE message_id = ? AND state IN ('queued','deferred')",
            (now, message_id),
        )
        return cur.rowcount

    def release(self, message_id: str) -> int:
        self._ids_for(message_id)
        now = self.now()
        cur = self._conn().execute(
            "UPDATE recipient SET state = COALESCE(held_from, 'queued'), held_from = NULL, next_attempt = ?,"
            " updated = ? WHERE message_id = ? AND state = 'held'",
            (now, now, message_id),
        )
        self._notify()
        return cur.rowcount

    def delete(self, message_id: str) -> None:
        self._ids_for(message_id)
        conn = self._conn()
        spools = [r[0] for r in conn.execute("SELECT spool FROM message WHERE id = ?", (message_id,))]
        conn.execute("DELETE FROM message WHERE id = ?", (message_id,))
        spool.unlink(self.spool_dir, spools)  # after the record is gone: a crash in between leaves an orphan

    def purge_final(self, keep_for: float) -> int:
        """Remove messages whose recipients are all final (delivered/bounced) for longer than keep_for."""
        cutoff = self.now() - keep_for
        conn = self._conn()
        done = (
            "SELECT message_id FROM recipient GROUP BY message_id"
            " HAVING SUM(state NOT IN ('delivered','bounced')) = 0 AND MAX(updated) < ?"
        )
        with self._transaction(conn):
            spools = [r[0] for r in conn.execute(f"SELECT spool FROM message WHERE id IN ({done})", (cutoff,))]
            cur = conn.execute(f"DELETE FROM message WHERE id IN ({done})", (cutoff,))
        spool.unlink(self.spool_dir, spools)
        return cur.rowcount

    def _notify(self, what: str = NEW_WORK) -> None:
        if self.on_enqueued is not None:
            try:
                self.on_enqueued(what)
            except Exception:  # noqa: BLE001 - a wake-up must never fail a write
                log.exception("on_enqueued callback failed")


def _new_work(msg: NewMessage) -> str:
    return NEW_WORK if any(r.local for r in msg.recipients) else NEW_REMOTE
