"""The queue's storage as SQLite sees it: commits counted in the WAL file, a disk that is really full, a database from an older release.

Commits are counted from outside, in the write-ahead log's own format (sqlite.org/fileformat2.html,
"The WAL file format"): a 32-byte header carrying two salts, then frames of a 24-byte header and
one page; a frame whose second field (database size after commit) is non-zero ends a transaction.
Frames of the current WAL generation carry the header's salts.
"""

from __future__ import annotations

import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest

from backend.queue.model import NewMessage, NewRecipient

from backend.queue.store import Queue
from tests.backend.faults import small_tmpfs
from tests.backend.helpers import ALICE, listener_block, maildir_files, wait_for_sync, write_config
from tests.lab.ports import free_port
from tests.lab.backend import Daemon, queue_json


def wal_commits(db: Path) -> tuple[tuple[int, int], int]:
    """(the WAL generation's salts, how many committed transactions that generation holds)."""
    data = Path(f"{db}-wal").read_bytes()
    magic, _version, page_size, _ckpt, salt1, salt2 = struct.unpack(">6I", data[:24])
    assert magic in (0x377F0682, 0x377F0683), hex(magic)
    commits, off = 0, 32
    while off + 24 + page_size <= len(data):
        _page, db_size_after_commit, s1, s2 = struct.unpack(">4I", data[off : off + 16])
        if (s1, s2) != (salt1, salt2):
            break  # left over from an earlier generation: the log ends here
        commits += db_size_after_commit != 0
        off += 24 + page_size
    return (salt1, salt2), commits


def _msg(body: bytes = b"body") -> NewMessage:
    return NewMessage("a@example.org", (NewRecipient("r@remote.example", "r@remote.example", False),),
                      b"Subject: x\r\n\r\n" + body + b"\r\n", "lan")


def test_twenty_concurrent_submissions_share_a_few_commits(tmp_path):
    db = tmp_path / "q.db"
    q = Queue(db)
    try:
        # Calibration: one writer at a time gets one commit per message (the count is real).
        salts, before = wal_commits(db)
        for _ in range(20):
            q.enqueue(_msg())
        assert wal_commits(db) == (salts, before + 20)

        # Twenty sessions finishing DATA at the same moment, each waiting for its own durability.
        start = threading.Barrier(20)
        ids: list[str] = []

        def session():
            start.wait()
            ids.append(q.enqueue(_msg()))

        threads = [threading.Thread(target=session) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        after_salts, after = wal_commits(db)
        assert after_salts == salts  # no checkpoint restarted the log in between
        commits = after - (before + 20)
        assert len(set(ids)) == 20 and len(q.list()) == 40
        print(f"20 concurrent enqueues: {commits} commits")
        assert 1 <= commits <= 5, commits  # group commit: far fewer fsyncs than messages (measured: 1-3)
    finally:
        q.close()


def test_a_message_too_big_for_the_disk_fails_alone_and_its_neighbours_are_stored(tmp_path):
    """A real ENOSPC (1 MiB tmpfs) for one write submitted together with two small ones."""
    data = tmp_path / "data"
    with small_tmpfs(data, "1m"):
        q = Queue(data / "q.db")
        try:
            small1, big, small2 = q.submit(_msg(b"one")), q.submit(_msg(b"x" * 2_000_000)), q.submit(_msg(b"two"))
            with pytest.raises(sqlite3.Error):
                big.result(30)
            stored = {small1.result(30), small2.result(30)}
            assert {e.id for e in q.list()} == stored
            # The queue is still writable once the failed write is rolled back.
            later = q.enqueue(_msg(b"three"))
        finally:
            q.close()
        # Durable: a new handle (as after a restart) finds exactly the three small messages.
        reopened = Queue(data / "q.db", group_commit=False)
        assert {e.id for e in reopened.list()} == stored | {later}
        assert {reopened.content(i) for i in stored | {later}} == {
            _msg(b).content for b in (b"one", b"two", b"three")
        }
        del reopened


# The schema before large bodies were spooled (commit e69c976): no ``spool`` column.
SCHEMA_BEFORE_SPOOL = """
CREATE TABLE message (
    id TEXT PRIMARY KEY, created REAL NOT NULL, sender TEXT NOT NULL, listener TEXT NOT NULL,
    client_addr TEXT, auth_user TEXT, size INTEGER NOT NULL, content BLOB NOT NULL,
    delay_dsn_sent INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE recipient (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL REFERENCES message(id) ON DELETE CASCADE,
    address TEXT NOT NULL, orig_address TEXT NOT NULL, domain TEXT NOT NULL, local INTEGER NOT NULL,
    state TEXT NOT NULL, held_from TEXT, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL,
    last_attempt REAL, last_reply TEXT, updated REAL NOT NULL
);
CREATE INDEX recipient_due ON recipient(state, next_attempt);
CREATE INDEX recipient_message ON recipient(message_id);
"""


def test_a_queue_from_before_spooled_bodies_is_upgraded_at_start_and_delivered(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, listener_block("lan", "lan", f"127.0.0.1:{port}", trusted_networks=["127.0.0.0/8"]))
    db = tmp_path / "data" / "queue.sqlite3"
    db.parent.mkdir(parents=True)
    now = time.time()
    body = b"From: carol@remote.example\r\nSubject: queued by the old release\r\n\r\nOLD-QUEUE-MARKER\r\n"
    with sqlite3.connect(db) as old:
        old.execute("PRAGMA journal_mode=WAL")
        old.executescript(SCHEMA_BEFORE_SPOOL)
        old.execute("INSERT INTO message (id, created, sender, listener, size, content) VALUES (?,?,?,?,?,?)",
                    ("0000OLD000001", now - 60, "carol@remote.example", "mx", len(body), body))
        old.execute("INSERT INTO recipient (message_id, address, orig_address, domain, local, state, next_attempt,"
                    " updated) VALUES (?,?,?,?,?,?,?,?)",
                    ("0000OLD000001", ALICE, ALICE, "example.org", 1, "queued", now - 60, now - 60))
    old.close()
    d = Daemon(cfg)
    try:
        d.start(port)
        files = wait_for_sync(lambda: maildir_files(tmp_path, ALICE), 20)
        assert len(files) == 1 and "OLD-QUEUE-MARKER" in files[0].read_text()
        [entry] = queue_json(cfg)
        assert entry["id"] == "0000OLD000001" and entry["recipients"][0]["state"] == "delivered"
        cols = {row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(message)")}
        assert {"spool", "folder"} <= cols  # both added by migrate(); the old message is filed in the inbox
    finally:
        d.stop()
