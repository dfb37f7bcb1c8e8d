"""Durable mail queue: enqueue with group commit, per-recipient state, scheduling, and admin operations.

Storage choice: one SQLite database in WAL mode with ``synchronous=FULL``, message bodies stored as
BLOBs next to their recipient rows. A commit is then a single append to the WAL plus one fsync, and
the message and its queue record become durable *atomically* — there is no window where a spool file
exists without its record or the reverse (the file + rename + directory fsync design needs a second
fsync and a clean-up pass for orphans). It also makes group commit trivial: every message that
finished DATA while the previous commit was syncing goes into the next transaction, so N concurrent
sessions cost one fsync, not N (Postfix pays one fsync per message).

Large bodies are the exception (``spool_large``): above SPOOL_THRESHOLD the body is written to its
own file under spool/ (write, fsync, rename, directory fsync) by the session's worker thread, and
only the record goes through the group commit. Otherwise a small message's commit would wait behind
25 MB of WAL writes from a neighbour (docs/benchmarks.md, B6). The record is committed only after
the file is durable; a crash in between leaves an orphan file that ``remove_orphans`` deletes at
the next start.

Every method is blocking; the daemon calls them from worker threads, never on the event loop.
The queue CLI opens the same database from another process while the daemon runs (WAL allows
readers beside the writer; writers wait on ``busy_timeout``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import queue as stdqueue
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from backend.durable import fsync_dir, unlink_quietly

log = logging.getLogger("homemx.queue")

QUEUED, DEFERRED, DELIVERED, BOUNCED, HELD = "queued", "deferred", "delivered", "bounced", "held"
ACTIVE_STATES = (QUEUED, DEFERRED)
FINAL_STATES = (DELIVERED, BOUNCED)
STATES = (QUEUED, DEFERRED, DELIVERED, BOUNCED, HELD)

SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id          TEXT PRIMARY KEY,
    created     REAL NOT NULL,
    sender      TEXT NOT NULL,            -- '' is the null reverse-path <>
    listener    TEXT NOT NULL,
    client_addr TEXT,
    auth_user   TEXT,
    size        INTEGER NOT NULL,
    content     BLOB NOT NULL,            -- CRLF-canonical, Received (and DKIM) headers included
    spool       TEXT,                     -- set: the body is in spool/<this> and content is empty
    delay_dsn_sent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipient (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   TEXT NOT NULL REFERENCES message(id) ON DELETE CASCADE,
    address      TEXT NOT NULL,           -- where it goes (after alias expansion)
    orig_address TEXT NOT NULL,           -- the RCPT TO the sender gave (DSN Original-Recipient)
    domain       TEXT NOT NULL,
    local        INTEGER NOT NULL,        -- 1: a Maildir on this host
    state        TEXT NOT NULL,
    held_from    TEXT,                    -- state to return to on release
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_attempt REAL,
    last_reply   TEXT,
    updated      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS recipient_due ON recipient(state, next_attempt);
CREATE INDEX IF NOT EXISTS recipient_message ON recipient(message_id);
"""


class QueueError(Exception):
    """A queue operation that cannot be done (unknown id, wrong state); the message says why."""


class QueueClosed(QueueError):
    """The queue takes no more writes: closed, or its writer thread is gone (sessions answer 451)."""


@dataclass(frozen=True)
class NewRecipient:
    address: str
    orig_address: str
    local: bool


@dataclass(frozen=True)
class NewMessage:
    sender: str  # '' for <>
    recipients: tuple[NewRecipient, ...]
    content: bytes
    listener: str
    client_addr: str | None = None
    auth_user: str | None = None
    id: str | None = None  # pre-assigned queue id (the Received header names it); None: assign one
    spool: str | None = None  # body already durable in spool/<spool> (see Queue.spool_large)


@dataclass(frozen=True)
class Recipient:
    id: int
    message_id: str
    address: str
    orig_address: str
    domain: str
    local: bool
    state: str
    attempts: int
    next_attempt: float
    last_attempt: float | None
    last_reply: str | None


@dataclass(frozen=True)
class QueueEntry:
    id: str
    created: float
    sender: str
    listener: str
    client_addr: str | None
    auth_user: str | None
    size: int
    recipients: tuple[Recipient, ...] = field(default=())
    delay_dsn_sent: bool = False

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "created": self.created,
            "sender": self.sender,
            "listener": self.listener,
            "client_addr": self.client_addr,
            "auth_user": self.auth_user,
            "size": self.size,
            "recipients": [
                {
                    "id": r.id,
                    "address": r.address,
                    "orig_address": r.orig_address,
                    "state": r.state,
                    "attempts": r.attempts,
                    "next_attempt": r.next_attempt,
                    "last_attempt": r.last_attempt,
                    "last_reply": r.last_reply,
                }
                for r in self.recipients
            ],
        }


def new_queue_id(now: float) -> str:
    """Sortable by arrival (millisecond hex time) and unique (random suffix)."""
    return f"{int(now * 1000):011X}{secrets.token_hex(3).upper()}"


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit, so a commit that returned survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class Queue:
    """The queue database. Thread-safe; all methods block (call them from worker threads)."""

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
            conn.executescript(SCHEMA)
            cols = {row[1] for row in conn.execute("PRAGMA table_info(message)")}
            if "spool" not in cols:  # a database from before spooled bodies
                conn.execute("ALTER TABLE message ADD COLUMN spool TEXT")
        self._pending: stdqueue.Queue = stdqueue.Queue()
        self._writer: threading.Thread | None = None
        # _lock orders "is the writer still taking work?" against putting work in _pending, so no
        # operation is ever left in the queue after the writer stopped (its caller would wait forever).
        self._lock = threading.Lock()
        self._closed = False
        self._stopped = False  # the writer thread has ended (closed, or died)
        self.failure: BaseException | None = None  # what killed the writer, if anything did
        if group_commit:
            self._writer = threading.Thread(target=self._writer_loop, name="queue-writer", daemon=True)
            self._writer.start()
        # Listeners get told when new work is queued (the runner wakes up instead of polling).
        self.on_enqueued: Callable[[], None] | None = None

    # -- connections ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
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
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._writer is not None and not self._stopped:
                self._pending.put(None)
        if self._writer is not None:
            self._writer.join(timeout=10)

    def healthy(self) -> bool:
        """False once the writer thread has died: nothing can be stored any more (the daemon's
        watchdog then stops it so that systemd restarts it)."""
        if self._writer is None:
            return not self._closed
        return self._writer.is_alive() and self.failure is None

    # -- writes (group commit) -----------------------------------------------------------------
    # Every write that must be durable before its caller goes on (a new message before the 250, a
    # delivery result before the next attempt is planned) is an operation handed to one writer
    # thread. The writer runs everything that queued up while the previous commit was syncing in a
    # single transaction: N concurrent writers cost one fsync.

    # Waiters may go away: a session whose client vanished after the dot is cancelled by aiosmtpd,
    # and cancelling the asyncio side cancels the concurrent future. That is normal. The writer
    # marks every future RUNNING when it takes the batch (set_running_or_notify_cancel), so from
    # then on nobody can cancel it and setting its result is always valid; a future already
    # cancelled before that keeps its op anyway. Policy: every submitted operation is executed,
    # whether or not anyone still waits for its result. Delivery outcomes must be recorded in any
    # case; a message whose client vanished at the dot is committed whole (the client saw no 250,
    # may send it again: a duplicate, which RFC 5321 6.1 prefers to a loss). Never half-written:
    # each operation is inside one SQLite transaction.

    def _write(self, op: Callable[[sqlite3.Connection, float], object], notify: bool = False) -> object:
        if self._writer is None:
            if self._closed:
                raise QueueClosed("the queue is closed")
            result = self._run_ops([op])[0]
            if notify:
                self._notify()
            return result
        return self._submit_op(op, notify).result()

    def _submit_op(self, op: Callable[[sqlite3.Connection, float], object], notify: bool = False) -> concurrent.futures.Future:
        """Hand ``op`` to the writer; ``notify``: wake the runner once it is committed (new work).
        Raises QueueClosed at once when the writer takes no more work."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed or self._stopped:
                raise QueueClosed(
                    "the queue is closed" if self._closed else f"the queue writer has stopped: {self.failure!r}"
                )
            self._pending.put((op, fut, notify))
        return fut

    def _writer_loop(self) -> None:
        batch: list = []
        try:
            while True:
                item = self._pending.get()
                if item is None:
                    return
                batch = [item]
                while len(batch) < 256:
                    try:
                        nxt = self._pending.get_nowait()
                    except stdqueue.Empty:
                        break
                    if nxt is None:
                        self._pending.put(None)
                        break
                    batch.append(nxt)
                self._commit_batch(batch)
                batch = []
        except BaseException as e:  # noqa: BLE001 - not a write failure (those are reported): a bug
            self.failure = e
            # ERROR with the traceback (it is a bug); the daemon's watchdog logs the one CRITICAL
            # line when it stops because of it (backend/run.py).
            log.error("queue writer died, nothing can be stored any more: %r", e, exc_info=e)
            raise
        finally:
            with self._lock:
                self._stopped = True
            # Nobody may wait forever: what was taken or is still queued fails now.
            gone = QueueClosed(f"the queue writer has stopped: {self.failure!r}")
            leftover = list(batch)
            while True:
                try:
                    item = self._pending.get_nowait()
                except stdqueue.Empty:
                    break
                if item is not None:
                    leftover.append(item)
            for _, fut, _ in leftover:
                # Those of the batch that failed are RUNNING already (or settled): asking again
                # would make concurrent.futures log a CRITICAL "unexpected state" line.
                if not (fut.running() or fut.done()):
                    fut.set_running_or_notify_cancel()
                _settle(fut, exc=gone)

    def _commit_batch(self, batch: list) -> None:
        """One transaction for the whole batch; on failure, each op alone (isolation)."""
        for _, fut, _ in batch:
            fut.set_running_or_notify_cancel()  # False: cancelled waiter, the op runs all the same
        try:
            results = self._run_ops([op for op, _, _ in batch])
        except Exception as e:  # noqa: BLE001 - reported to each waiting caller
            if len(batch) == 1:
                _settle(batch[0][1], exc=e)
                return
            # One bad write (say, a message too big for the remaining disk) must not fail its
            # neighbours: retry each on its own.
            for op, fut, notify in batch:
                try:
                    result = self._run_ops([op])[0]
                except Exception as e1:  # noqa: BLE001
                    _settle(fut, exc=e1)
                    continue
                _settle(fut, result=result)
                if notify:
                    self._notify()
            return
        for (_, fut, _), result in zip(batch, results):
            _settle(fut, result=result)
        if any(notify for _, _, notify in batch):
            self._notify()

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
        return self._write(self._insert_op(msg), notify=True)  # type: ignore[return-value]

    def submit(self, msg: NewMessage) -> concurrent.futures.Future:
        """Hand a message to the group-commit writer without blocking; the future's result is the
        queue id, set once the message is durable (asyncio callers await ``asyncio.wrap_future``)."""
        if self._writer is None:
            raise RuntimeError("submit() needs the group-commit writer")
        return self._submit_op(self._insert_op(msg), notify=True)

    @staticmethod
    def _insert_op(msg: NewMessage) -> Callable[[sqlite3.Connection, float], str]:
        def insert(conn: sqlite3.Connection, now: float) -> str:
            qid = msg.id or new_queue_id(now)
            conn.execute(
                "INSERT INTO message (id, created, sender, listener, client_addr, auth_user, size, content, spool)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (qid, now, msg.sender, msg.listener, msg.client_addr, msg.auth_user, len(msg.content),
                 b"" if msg.spool else msg.content, msg.spool),
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
        return self._recipients_by_ids(ids)  # type: ignore[arg-type]

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

    def _recipients_by_ids(self, ids: Iterable[int]) -> list[Recipient]:
        ids = list(ids)
        if not ids:
            return []
        q = ",".join("?" * len(ids))
        rows = self._conn().execute(
            "SELECT id, message_id, address, orig_address, domain, local, state, attempts, next_attempt,"
            f" last_attempt, last_reply FROM recipient WHERE id IN ({q}) ORDER BY id",
            ids,
        ).fetchall()
        return [_recipient(r) for r in rows]

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
        without the notice (issue 11 point 2). It is one group-commit operation, so it batches
        with other writes like any of them. Returns the queue ids of ``dsns``, in order.
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
            if delay_dsn_for is not None:
                conn.execute("UPDATE message SET delay_dsn_sent = 1 WHERE id = ?", (delay_dsn_for,))
            return [insert(conn, now) for insert in inserts]

        return self._write(record, notify=bool(inserts))  # type: ignore[return-value]

    def content(self, message_id: str) -> bytes:
        row = self._conn().execute("SELECT content, spool FROM message WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise QueueError(f"no message {message_id}")
        if row[1]:
            return (self.spool_dir / row[1]).read_bytes()
        return bytes(row[0])

    # -- spooled bodies --------------------------------------------------------------------------

    SPOOL_THRESHOLD = 256 * 1024

    def spool_large(self, msg: NewMessage) -> NewMessage:
        """Blocking. For a body above SPOOL_THRESHOLD, make it durable in its own file and return
        the message with ``spool`` set; smaller messages are returned as they are."""
        if len(msg.content) <= self.SPOOL_THRESHOLD or msg.spool:
            return msg
        qid = msg.id or new_queue_id(self.now())
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        final = self.spool_dir / qid
        tmp = self.spool_dir / f"{qid}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(msg.content)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
            fsync_dir(self.spool_dir)
        except BaseException:
            unlink_quietly(tmp, final)
            raise
        return dataclasses.replace(msg, id=qid, spool=qid)

    def remove_orphans(self) -> int:
        """Delete spool files without a queue record (a crash between the file and the commit).
        Only at daemon start: while sessions run, a file may be durable and its record not yet."""
        if not self.spool_dir.exists():
            return 0
        known = {row[0] for row in self._conn().execute("SELECT spool FROM message WHERE spool IS NOT NULL")}
        removed = 0
        for name in os.listdir(self.spool_dir):
            if name not in known:
                os.unlink(self.spool_dir / name)
                removed += 1
        return removed

    def _unlink_spools(self, names) -> None:
        unlink_quietly(*(self.spool_dir / n for n in names if n))

    def mark_delay_dsn_sent(self, message_id: str) -> None:
        """Remember that the message's one "delayed" notice went out (prefer ``record_outcomes``,
        which does this in the same commit as the notice itself)."""
        self.record_outcomes([], delay_dsn_for=message_id)

    # -- reading -------------------------------------------------------------------------------

    def get(self, message_id: str) -> QueueEntry:
        conn = self._conn()
        row = conn.execute(
            "SELECT id, created, sender, listener, client_addr, auth_user, size, delay_dsn_sent FROM message"
            " WHERE id = ?",
            (message_id,),
        ).fetchone()
        if row is None:
            raise QueueError(f"no message {message_id} in the queue")
        rcpts = conn.execute(
            "SELECT id, message_id, address, orig_address, domain, local, state, attempts, next_attempt,"
            " last_attempt, last_reply FROM recipient WHERE message_id = ? ORDER BY id",
            (message_id,),
        ).fetchall()
        return _entry(row, [_recipient(r) for r in rcpts])

    def list(self, states: Iterable[str] | None = None) -> list[QueueEntry]:
        conn = self._conn()
        rows = conn.execute(
            "SELECT id, created, sender, listener, client_addr, auth_user, size, delay_dsn_sent FROM message"
            " ORDER BY created, id"
        ).fetchall()
        rcpts = conn.execute(
            "SELECT id, message_id, address, orig_address, domain, local, state, attempts, next_attempt,"
            " last_attempt, last_reply FROM recipient ORDER BY id"
        ).fetchall()
        by_msg: dict[str, list[Recipient]] = {}
        for r in rcpts:
            by_msg.setdefault(r[1], []).append(_recipient(r))
        wanted = set(states) if states else None
        out = []
        for row in rows:
            rs = by_msg.get(row[0], [])
            if wanted is None or any(r.state in wanted for r in rs):
                out.append(_entry(row, rs))
        return out

    def stats(self) -> tuple[dict[str, int], float | None]:
        """(recipient count by state, creation time of the oldest message with unfinished recipients)."""
        conn = self._conn()
        counts = {s: 0 for s in STATES}
        for state, n in conn.execute("SELECT state, COUNT(*) FROM recipient GROUP BY state"):
            counts[state] = n
        row = conn.execute(
            "SELECT MIN(m.created) FROM message m JOIN recipient r ON r.message_id = m.id"
            " WHERE r.state IN ('queued','deferred','held')"
        ).fetchone()
        return counts, row[0]

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
        self._unlink_spools(spools)  # after the record is gone: a crash in between leaves an orphan

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
        self._unlink_spools(spools)
        return cur.rowcount

    def _notify(self) -> None:
        if self.on_enqueued is not None:
            try:
                self.on_enqueued()
            except Exception:  # noqa: BLE001 - a wake-up must never fail a write
                log.exception("on_enqueued callback failed")


def _settle(fut: concurrent.futures.Future, result: object = None, exc: BaseException | None = None) -> None:
    """Give a RUNNING future its outcome. Harmless on a future that is already done (cancelled
    before the writer took it): a waiter that went away is normal, never the writer's error."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _recipient(r) -> Recipient:
    return Recipient(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9], r[10])


def _entry(row, rcpts: list[Recipient]) -> QueueEntry:
    return QueueEntry(row[0], row[1], row[2], row[3], row[4], row[5], row[6], tuple(rcpts), bool(row[7]))
