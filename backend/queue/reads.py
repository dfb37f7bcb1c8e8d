"""The queries that read the queue database back as the records of backend/queue/model.py
(messages with their recipients, recipients by id, counts by state)."""

from __future__ import annotations

import sqlite3
from typing import Iterable

from backend.queue.model import STATES, QueueEntry, Recipient

MESSAGE_COLUMNS = "id, created, sender, listener, client_addr, auth_user, size, delay_dsn_sent, folder, api_key"
RECIPIENT_COLUMNS = (
    "id, message_id, address, orig_address, domain, local, state, attempts, next_attempt, last_attempt, last_reply"
)


def entry(conn: sqlite3.Connection, message_id: str) -> QueueEntry | None:
    """The message with its recipients; None: no such message."""
    row = conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM message WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        return None
    rcpts = conn.execute(
        f"SELECT {RECIPIENT_COLUMNS} FROM recipient WHERE message_id = ? ORDER BY id", (message_id,)
    ).fetchall()
    return _entry(row, [_recipient(r) for r in rcpts])


def entries(conn: sqlite3.Connection, states: Iterable[str] | None = None) -> list[QueueEntry]:
    """Every message in arrival order; ``states``: only those with a recipient in one of them."""
    rows = conn.execute(f"SELECT {MESSAGE_COLUMNS} FROM message ORDER BY created, id").fetchall()
    rcpts = conn.execute(f"SELECT {RECIPIENT_COLUMNS} FROM recipient ORDER BY id").fetchall()
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


def recipients_by_ids(conn: sqlite3.Connection, ids: Iterable[int]) -> list[Recipient]:
    ids = list(ids)
    if not ids:
        return []
    q = ",".join("?" * len(ids))
    rows = conn.execute(f"SELECT {RECIPIENT_COLUMNS} FROM recipient WHERE id IN ({q}) ORDER BY id", ids).fetchall()
    return [_recipient(r) for r in rows]


def stats(conn: sqlite3.Connection) -> tuple[dict[str, int], float | None]:
    """(recipient count by state, creation time of the oldest message with unfinished recipients)."""
    counts = {s: 0 for s in STATES}
    for state, n in conn.execute("SELECT state, COUNT(*) FROM recipient GROUP BY state"):
        counts[state] = n
    row = conn.execute(
        "SELECT MIN(m.created) FROM message m JOIN recipient r ON r.message_id = m.id"
        " WHERE r.state IN ('queued','deferred','held')"
    ).fetchone()
    return counts, row[0]


def oldest_unfinished(conn: sqlite3.Connection) -> tuple[str, float] | None:
    """(id, creation time) of the oldest message with a recipient still to deliver (queued,
    deferred or held); None when there is none."""
    return conn.execute(
        "SELECT m.id, m.created FROM message m JOIN recipient r ON r.message_id = m.id"
        " WHERE r.state IN ('queued','deferred','held') ORDER BY m.created, m.id LIMIT 1"
    ).fetchone()


def last_attempted(conn: sqlite3.Connection, states: Iterable[str]) -> Recipient | None:
    """The recipient in one of ``states`` whose last delivery attempt is the most recent (its
    last_attempt and last_reply say when and what); None when no such recipient was attempted."""
    states = list(states)
    q = ",".join("?" * len(states))
    row = conn.execute(
        f"SELECT {RECIPIENT_COLUMNS} FROM recipient WHERE state IN ({q}) AND last_attempt IS NOT NULL"
        " ORDER BY last_attempt DESC, id DESC LIMIT 1", states,
    ).fetchone()
    return _recipient(row) if row is not None else None


def _recipient(r) -> Recipient:
    return Recipient(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7], r[8], r[9], r[10])


def _entry(row, rcpts: list[Recipient]) -> QueueEntry:
    return QueueEntry(row[0], row[1], row[2], row[3], row[4], row[5], row[6], tuple(rcpts), bool(row[7]), row[8], row[9])
