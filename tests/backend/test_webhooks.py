"""Delivery webhooks of the HTTP send API (issue 18): the queue records which API key sent a
message, and outcomes of such messages become signed events POSTed to the key's webhook."""

from __future__ import annotations

import sqlite3

from backend.queue.model import NewMessage, NewRecipient
from backend.queue.store import Queue

# The queue database as the release before the HTTP API wrote it: message rows without api_key.
SCHEMA_BEFORE_API = """
CREATE TABLE message (
    id TEXT PRIMARY KEY, created REAL NOT NULL, sender TEXT NOT NULL, listener TEXT NOT NULL,
    client_addr TEXT, auth_user TEXT, size INTEGER NOT NULL, content BLOB NOT NULL, spool TEXT,
    delay_dsn_sent INTEGER NOT NULL DEFAULT 0, folder TEXT
);
CREATE TABLE recipient (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL REFERENCES message(id) ON DELETE CASCADE,
    address TEXT NOT NULL, orig_address TEXT NOT NULL, domain TEXT NOT NULL, local INTEGER NOT NULL,
    state TEXT NOT NULL, held_from TEXT, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
    last_attempt REAL, last_reply TEXT, updated REAL NOT NULL
);
"""


def _api_message(api_key: str | None) -> NewMessage:
    return NewMessage("app@home.example", (NewRecipient("r@remote.example", "r@remote.example", False),),
                      b"Subject: x\r\n\r\nbody\r\n", "api", api_key=api_key)


def test_an_old_queue_gains_the_api_key_column_and_the_key_round_trips(tmp_path):
    db = tmp_path / "queue.sqlite3"
    with sqlite3.connect(db) as old:
        old.executescript(SCHEMA_BEFORE_API)
        old.execute("INSERT INTO message (id, created, sender, listener, size, content) VALUES (?,?,?,?,?,?)",
                    ("0000OLD000001", 1.0, "a@home.example", "lan", 4, b"x\r\n"))
        old.execute("INSERT INTO recipient (message_id, address, orig_address, domain, local, state, next_attempt,"
                    " updated) VALUES (?,?,?,?,?,?,?,?)",
                    ("0000OLD000001", "r@remote.example", "r@remote.example", "remote.example", 0, "queued", 1.0, 1.0))
    old.close()
    q = Queue(db, group_commit=False)
    try:
        assert q.get("0000OLD000001").api_key is None  # the old message was not sent through the API
        sent = q.enqueue(_api_message("key_7f3a"))
        smtp = q.enqueue(_api_message(None))
        assert q.get(sent).api_key == "key_7f3a"
        assert q.get(sent).to_json()["api_key"] == "key_7f3a"
        assert q.get(smtp).api_key is None
        assert [e.api_key for e in q.list()] == [None, "key_7f3a", None]
    finally:
        q.close()
    cols = {row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(message)")}
    assert "api_key" in cols
