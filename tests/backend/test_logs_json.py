"""`[server] log_format = "json"`: a real `homemx-backend run` process logs one JSON object per line,
and a real SMTP transaction's connection, acceptance and delivery lines carry their key=value pairs
as fields (conn, client, queue, from, rcpts...), which text a client sends cannot forge."""

from __future__ import annotations

import json
import logging
import smtplib

from backend.logsetup import JSONFormatter
from tests.backend.helpers import BOB, wait_for_sync
from tests.lab.backend import Daemon, daemons, lan_config  # noqa: F401 - fixture
from tests.lab.ports import free_port

# A quoted local part (RFC 5321 4.1.2) that looks like fields of the log line.
FORGER = '"x rcpts=99 conn=evil"@example.org'


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_of_a_real_transaction(tmp_path, daemons):
    port = free_port("127.0.0.1")
    cfg = lan_config(tmp_path, port, server_extra='log_format = "json"')
    daemon = Daemon(cfg).start(port)
    daemons.append(daemon)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.sendmail(FORGER, [BOB], f"From: {FORGER}\r\nTo: {BOB}\r\nSubject: json\r\n\r\nbody\r\n")
    wait_for_sync(lambda: "delivered to maildir" in daemon.log.read_text(), 20)
    daemon.stop()

    entries = json_lines(daemon.log.read_text())  # every line parses
    assert entries and all({"timestamp", "level", "logger", "message"} <= e.keys() for e in entries)
    assert all(e["timestamp"].endswith("+00:00") for e in entries)

    queued = [e for e in entries if e["logger"] == "homemx.accept"]
    assert len(queued) == 1
    q = queued[0]
    assert q["level"] == "INFO"
    assert q["client"] == "127.0.0.1"
    assert q["conn"].startswith("lan-")
    assert q["from"] == FORGER and q["rcpts"] == 1  # the address did not become fields
    assert isinstance(q["size"], int) and isinstance(q["duration"], float)
    assert q["message"].startswith(f"conn={q['conn']} client=127.0.0.1 queued {q['queue']} from=<{FORGER}> rcpts=1 ")

    conn = [e for e in entries if e.get("conn") == q["conn"] and "outcome" in e]
    assert len(conn) == 1
    assert conn[0]["listener"] == "lan" and conn[0]["client"] == "127.0.0.1"
    assert conn[0]["outcome"] == "accepted" and conn[0]["accepted"] == 1

    delivered = [e for e in entries if e.get("queue") == q["queue"] and e["logger"] == "homemx.runner"]
    assert [e["rcpt"] for e in delivered] == [BOB]


def record(msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord("homemx.test", logging.INFO, __file__, 1, msg, args, None)


def test_fields_come_from_the_format_string_only():
    f = JSONFormatter()
    e = json.loads(f.format(record("conn=%s client=%s outcome=%s duration=%.3fs", "mx-1", "\x1b[31m 10.0.0.1", "eof", 0.12345)))
    assert e["conn"] == "mx-1" and e["outcome"] == "eof"
    assert e["client"] == "\\x1b[31m 10.0.0.1"  # controls escaped as in text lines
    assert e["duration"] == 0.123
    e = json.loads(f.format(record("100%% of %d done, message=%s level=%s", 3, "x", "y")))
    assert e["message"] == "100% of 3 done, message=x level=y"  # the four base fields cannot be overwritten
    assert e["level"] == "INFO" and "3" not in e
    assert json.loads(f.format(record("no fields")))["message"] == "no fields"


def test_text_timestamps_are_loggings_own_across_seconds():
    # EscapingFormatter keeps the text of the current second (logsetup.formatTime): every line
    # must still carry the time logging itself would write, also when the second changes.
    from backend.logsetup import EscapingFormatter

    ours = EscapingFormatter("%(asctime)s %(message)s")
    theirs = logging.Formatter("%(asctime)s %(message)s")
    base = 1_780_000_000.0
    for created in [base + i * 0.37 for i in range(40)] + [base + 86_400 * 180.999, base - 5.5, base + 0.999]:
        record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello", None, None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert ours.format(record) == theirs.format(record)
