"""The queue database's layout: its tables (DDL), how a connection is opened, and the migrations
that bring a database written by an older version up to date.

One SQLite database in WAL mode with ``synchronous=FULL``, message bodies stored as BLOBs next to
their recipient rows: a commit is a single append to the WAL plus one fsync, and the message and its
queue record become durable *atomically* — there is no window where a spool file exists without its
record or the reverse (the file + rename + directory fsync design needs a second fsync and a
clean-up pass for orphans). Large bodies are the exception (backend/queue/spool.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

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
    delay_dsn_sent INTEGER NOT NULL DEFAULT 0,
    folder      TEXT,                     -- local delivery into this Maildir++ folder (Junk); NULL: the inbox
    api_key     TEXT                      -- the HTTP API key that sent it (issue 18); NULL: not the API
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
-- The runner's local-only round (remote delivery paused or absent): local mail due first, read in
-- order, without visiting the deferred remote backlog (without it, 5.9 s per round at 1M deferred
-- messages: docs/benchmarks.md, B7). Partial: only active rows, the only ones those queries read.
CREATE INDEX IF NOT EXISTS recipient_local_due ON recipient(local, next_attempt)
    WHERE state IN ('queued','deferred');
-- Delivery webhooks of API keys (backend/http/webhooks.py): one row per event, written in the commit
-- that records the recipient's outcome. No foreign key: an event outlives its purged message.
CREATE TABLE IF NOT EXISTS webhook_event (
    id           TEXT PRIMARY KEY,        -- evt_<hex>, the receiver's de-duplication key
    api_key      TEXT NOT NULL,           -- the key whose webhook_url gets it
    message_id   TEXT NOT NULL,
    recipient    TEXT NOT NULL,
    event        TEXT NOT NULL,           -- delivered, deferred, bounced
    created      REAL NOT NULL,
    payload      TEXT NOT NULL,           -- the JSON body, fixed when the event happened
    state        TEXT NOT NULL,           -- pending, sent, failed (given up)
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_attempt REAL,
    last_error   TEXT,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS webhook_event_due ON webhook_event(state, next_attempt);
CREATE INDEX IF NOT EXISTS webhook_event_message ON webhook_event(message_id);
"""


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the pragmas every user of the queue database needs (autocommit: the
    store opens its transactions itself)."""
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit, so a commit that returned survives power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def migrate(conn: sqlite3.Connection) -> None:
    """Create what is missing and upgrade an older database in place. Idempotent: the schema has
    no version number; each migration checks for what it adds."""
    conn.executescript(SCHEMA)
    cols = {row[1] for row in conn.execute("PRAGMA table_info(message)")}
    if "spool" not in cols:  # a database from before spooled bodies
        conn.execute("ALTER TABLE message ADD COLUMN spool TEXT")
    if "folder" not in cols:  # a database from before the Junk folder (issue 13)
        conn.execute("ALTER TABLE message ADD COLUMN folder TEXT")
    if "api_key" not in cols:  # a database from before the HTTP send API (issue 18)
        conn.execute("ALTER TABLE message ADD COLUMN api_key TEXT")
