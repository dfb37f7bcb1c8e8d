"""Local delivery that cannot write the Maildir, and the queue CLI that gets it delivered: `queue retry`, `queue hold`/`release` against a running daemon.

The faults are real: a full tmpfs under the mailbox, a regular file where the Maildir directory
should be. The retry schedule is one hour, so a recipient attempted again within the test was
made due by the CLI, never by the schedule (but in the max-age test, which waits for the schedule).
"""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

import pytest

from tests.backend.faults import fill, small_tmpfs
from tests.backend.helpers import ALICE, BOB, listener_block, maildir_files, run_cli, wait_for_sync, write_config
from tests.lab.ports import free_port
from tests.lab.backend import Daemon, queue_json

RETRY_HOUR = '[delivery]\nnameservers = ["127.0.0.1"]\ndns_port = 9\nretry_schedule = ["1h"]\n'
MARKER = "MAILDIR-FAULT-MARKER-51c2"


def lan_daemon_config(tmp_path: Path, delivery: str) -> tuple[Path, int]:
    """(config, port) of a backend with one lan listener and the given [delivery] table."""
    port = free_port()
    cfg = write_config(tmp_path, listener_block("lan", "lan", f"127.0.0.1:{port}", trusted_networks=["127.0.0.0/8"]),
                       extra=delivery)
    return cfg, port


@pytest.fixture
def daemon_cfg(tmp_path):
    return lan_daemon_config(tmp_path, RETRY_HOUR)


def send_to_bob(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("app")
        s.mail(ALICE)
        s.rcpt(BOB)
        code, resp = s.data(f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: fault\r\n\r\n{MARKER}\r\n")
    assert code == 250, (code, resp)
    return resp.decode().rsplit(" ", 1)[1]


def rcpt_row(cfg: Path, qid: str) -> dict:
    [entry] = [e for e in queue_json(cfg) if e["id"] == qid]
    [row] = entry["recipients"]
    return row


def bob_mailbox(tmp_path: Path) -> Path:
    return tmp_path / "data" / "mail" / "example.org" / "bob"


def block_bobs_maildir(tmp_path: Path) -> Path:
    """A regular file where bob's Maildir directory belongs: every write to it fails (ENOTDIR)."""
    blocker = bob_mailbox(tmp_path) / "Maildir"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the Maildir directory belongs\n")
    return blocker


def test_full_maildir_disk_defers_and_queue_retry_makes_it_due_now(tmp_path, daemon_cfg):
    cfg, port = daemon_cfg
    with small_tmpfs(bob_mailbox(tmp_path), "256k") as box:
        filler = fill(box)
        d = Daemon(cfg)
        try:
            d.start(port)
            qid = send_to_bob(port)
            row = wait_for_sync(lambda: (r := rcpt_row(cfg, qid))["state"] == "deferred" and r, 20)
            assert row["last_reply"].startswith("451 4.3.0 Maildir write failed"), row
            assert "No space left on device" in row["last_reply"], row
            assert row["attempts"] == 1 and row["next_attempt"] > time.time() + 3000  # the schedule's hour
            assert not maildir_files(tmp_path, BOB)

            # Still full: `queue retry` makes it due at once, the daemon attempts it again (and defers).
            before = time.time()
            r = run_cli("queue", "retry", qid, "-c", str(cfg))
            assert r.returncode == 0, r.stderr
            row = wait_for_sync(lambda: (r := rcpt_row(cfg, qid))["attempts"] == 2 and r, 20)
            assert row["state"] == "deferred" and row["last_attempt"] >= before

            filler.unlink()
            assert run_cli("queue", "retry", qid, "-c", str(cfg)).returncode == 0
            row = wait_for_sync(lambda: (r := rcpt_row(cfg, qid))["state"] == "delivered" and r, 20)
            assert row["attempts"] == 3
            [delivered] = maildir_files(tmp_path, BOB)
            assert MARKER in delivered.read_text()
        finally:
            d.stop()


def test_maildir_blocked_by_a_file_defers_then_hold_and_release_deliver(tmp_path, daemon_cfg):
    cfg, port = daemon_cfg
    blocker = block_bobs_maildir(tmp_path)
    d = Daemon(cfg)
    try:
        d.start(port)
        qid = send_to_bob(port)
        row = wait_for_sync(lambda: (r := rcpt_row(cfg, qid))["state"] == "deferred" and r, 20)
        assert row["last_reply"].startswith("451 4.3.0 Maildir write failed"), row
        planned = row["next_attempt"]
        assert planned > time.time() + 3000

        r = run_cli("queue", "hold", qid, "--json", "-c", str(cfg))
        assert r.returncode == 0, r.stderr
        row = rcpt_row(cfg, qid)
        assert row["state"] == "held" and row["next_attempt"] == planned

        blocker.unlink()
        before = time.time()
        r = run_cli("queue", "release", qid, "-c", str(cfg))
        assert r.returncode == 0, r.stderr
        # Released as due now (not at the hour the schedule planned): delivered while we wait.
        row = wait_for_sync(lambda: (r := rcpt_row(cfg, qid))["state"] == "delivered" and r, 20)
        assert row["attempts"] == 2 and row["last_attempt"] >= before
        [delivered] = maildir_files(tmp_path, BOB)
        assert MARKER in delivered.read_text()
    finally:
        d.stop()


def test_maildir_failing_until_the_max_age_bounces_with_a_dsn_to_the_sender(tmp_path):
    # A Maildir that never heals: at max_queue_age the local recipient is given up as a remote one
    # would be (554 5.4.7 with the last error), and the sender (local here) gets the DSN.
    cfg, port = lan_daemon_config(tmp_path, '[delivery]\nnameservers = ["127.0.0.1"]\ndns_port = 9\n'
                                            'retry_schedule = ["1s"]\nmax_queue_age = "3s"\n')
    blocker = block_bobs_maildir(tmp_path)
    d = Daemon(cfg)
    try:
        d.start(port)
        qid = send_to_bob(port)
        row = wait_for_sync(lambda: (r := rcpt_row(cfg, qid))["state"] == "bounced" and r, 30)
        assert row["last_reply"].startswith("554 5.4.7 Delivery time expired after "), row
        assert "last error: 451 4.3.0 Maildir write failed: Not a directory" in row["last_reply"], row
        assert row["attempts"] >= 2  # deferred first, given up at the max age
        [report] = wait_for_sync(lambda: maildir_files(tmp_path, ALICE), 20)
        text = report.read_text()
        assert "Content-Type: multipart/report; report-type=delivery-status" in text
        assert f"Final-Recipient: rfc822;{BOB}" in text and "Action: failed" in text and "Status: 5.4.7" in text
        assert "Maildir write failed" in text
        assert blocker.read_text().startswith("a file")  # nothing written where the Maildir belongs
    finally:
        d.stop()
