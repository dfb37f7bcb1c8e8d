"""Bounces are never lost: outcomes and their DSN are one commit, and a finished destination does not wait for a slow one.

The crash test is a real `homemx-backend run` process delivering one message with 80 recipients
to a fake remote MX (a plain socket server on loopback, found through a real nsd) that refuses
every RCPT with 550. The backend is SIGKILLed right after the remote's last reply, or at the first
moment a bounced recipient is visible in the queue database (the middle of bounce recording);
after the restart every recipient is either still to be tried or bounced *and* listed in a queued
DSN, and once retried, every recipient is reported exactly once.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import signal
import smtplib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from backend.queue.model import BOUNCED, DELIVERED
from tests.backend.helpers import ALICE, run_cli, wait_for, wait_for_sync
from tests.lab.ports import free_port
from tests.lab.delivery_fixtures import ca, dns_server, make, parse_dsn, receivers  # noqa: F401 - fixtures
from tests.lab.delivery import Sink
from tests.lab.backend import Daemon, daemons, lan_config, queue_db  # noqa: F401 - fixture
from tests.lab.refusing_mx import RefusingMX
from tests.conftest import require_tool
from tests.lab.nsd import NSD, zone_text

N_RCPTS = 80
REMOTE_MX = "127.0.0.41"


# ---------------------------------------------------------------- a destination that is done first


class GatedSink(Sink):
    """A receiver whose DATA reply waits until the test opens the gate (a slow MX)."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.in_data = asyncio.Event()

    async def handle_DATA(self, server, session, envelope):
        self.in_data.set()
        await self.gate.wait()
        return await super().handle_DATA(server, session, envelope)


@pytest.mark.asyncio
async def test_a_finished_destination_is_recorded_with_its_dsn_while_a_slow_one_is_still_under_way(make, receivers):
    slow = await receivers.start("127.0.0.11", GatedSink())  # dest.test
    await receivers.start("127.0.0.14", Sink(rcpt_replies={"x@amx.test": "550 5.1.1 No such user"}))  # amx.test
    h = make()
    qid = h.submit("alice@example.org", ["bob@dest.test", "x@amx.test"])
    attempt = asyncio.create_task(h.round())
    try:
        await asyncio.wait_for(slow.in_data.wait(), 10)
        # dest.test's transaction is open and waiting; amx.test's bounce is already durable, and
        # so is its report (a crash now would lose neither).
        await wait_for(lambda: h.states(qid)["x@amx.test"][0] == BOUNCED and len(h.others(qid)) == 1, 10)
        assert h.states(qid)["bob@dest.test"][0] != DELIVERED
        (report,) = h.others(qid)
        assert [r.address for r in report.recipients] == ["alice@example.org"]
        _, _, per_rcpt, _ = parse_dsn(h.queue.content(report.id))
        assert [f["Final-Recipient"] for f in per_rcpt] == ["rfc822;x@amx.test"]
    finally:
        slow.gate.set()
        await attempt
    assert h.states(qid)["bob@dest.test"][0] == DELIVERED
    assert len(h.others(qid)) == 1  # delivered recipients add no report


# ---------------------------------------------------------------- a real crash while bounces are recorded


def _read_only(tmp: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{queue_db(tmp)}?mode=ro", uri=True, timeout=30)


def _recipient_states(tmp: Path, qid: str) -> dict[str, str]:
    with _read_only(tmp) as db:
        return dict(db.execute("SELECT address, state FROM recipient WHERE message_id = ?", (qid,)))


def _reported(tmp: Path, qid: str) -> list[str]:
    """Every Final-Recipient of every failure report about ``qid`` in the queue (duplicates kept)."""
    out = []
    with _read_only(tmp) as db:
        for (content,) in db.execute("SELECT content FROM message WHERE sender = ''"):
            msg = email.message_from_bytes(bytes(content), policy=email.policy.compat32)
            status = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"][0]
            per_message, *per_rcpt = status.get_payload()
            if per_message["X-Homemx-Queue-ID"] != qid:
                continue
            for f in per_rcpt:
                assert f["Action"] == "failed"
                out.append(f["Final-Recipient"].partition(";")[2])
    return out


def _kill_when_a_bounce_is_committed(tmp: Path, proc, done: threading.Event) -> None:
    """SIGKILL ``proc`` the moment the queue shows a bounced recipient: in the middle of recording."""
    deadline = time.monotonic() + 30
    db = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                db = db or _read_only(tmp)
                if db.execute("SELECT 1 FROM recipient WHERE state = 'bounced' LIMIT 1").fetchone():
                    os.killpg(proc.pid, signal.SIGKILL)
                    return
            except sqlite3.OperationalError:
                pass  # the database is being created
    finally:
        if db is not None:
            db.close()
        done.set()


@pytest.mark.parametrize("moment", ["after-the-last-550", "first-bounce-committed"])
def test_sigkill_while_bounces_are_recorded_never_loses_a_report(tmp_path, daemons, moment):
    require_tool("/usr/sbin/nsd")
    rcpts = [f"user{i:02d}@refuse.test" for i in range(N_RCPTS)]
    killed = threading.Event()
    holder: dict = {}

    def kill_now():
        os.killpg(holder["daemon"].proc.pid, signal.SIGKILL)
        killed.set()

    def watch_queue():
        holder["watcher"] = threading.Thread(
            target=_kill_when_a_bounce_is_committed, args=(tmp_path, holder["daemon"].proc, killed), daemon=True
        )
        holder["watcher"].start()

    remote = RefusingMX(REMOTE_MX, N_RCPTS)
    if moment == "after-the-last-550":
        remote.on_last_refusal = kill_now
    else:
        remote.on_last_refusal = watch_queue
    zone = zone_text("refuse.test", f"@ IN MX 10 mx\nmx IN A {REMOTE_MX}\n")
    try:
        with NSD({"refuse.test": zone}) as ns:
            port = free_port()
            cfg = lan_config(
                tmp_path,
                port,
                extra=(
                    f'[delivery]\nnameservers = ["{ns.address}"]\ndns_port = {ns.port}\n'
                    f'remote_port = {remote.port}\nmta_sts = false\nretry_schedule = ["1h"]\n'
                ),
            )
            d = Daemon(cfg).start(port)
            daemons.append(d)
            holder["daemon"] = d
            with smtplib.SMTP("127.0.0.1", port) as s:
                s.ehlo("app")
                s.mail(ALICE)
                for r in rcpts:
                    assert s.rcpt(r)[0] == 250
                code, resp = s.data(f"From: {ALICE}\r\nTo: undisclosed-recipients:;\r\nSubject: many\r\n\r\nbody\r\n")
                assert code == 250
                qid = resp.decode().rsplit(" ", 1)[1]
            assert killed.wait(60), "the backend was never killed"
            d.proc.wait(10)
            assert d.proc.returncode == -signal.SIGKILL

            # After the crash, on disk: each recipient is still to be tried, or bounced AND reported.
            states = _recipient_states(tmp_path, qid)
            assert sorted(states) == sorted(rcpts)
            reported = _reported(tmp_path, qid)
            bounced = sorted(a for a, s in states.items() if s == BOUNCED)
            assert sorted(set(reported)) == bounced, f"{len(bounced)} bounced, {len(set(reported))} reported"
            assert all(s in ("queued", "deferred", BOUNCED) for s in states.values()), states
            remote.on_last_refusal = None

            # Restart and retry now: the rest is refused again and reported, nothing twice.
            d2 = Daemon(cfg).start(port)
            daemons.append(d2)
            assert run_cli("queue", "retry", "-c", str(cfg)).returncode == 0
            wait_for_sync(lambda: set(_recipient_states(tmp_path, qid).values()) == {BOUNCED}, 30)
            wait_for_sync(lambda: len(_reported(tmp_path, qid)) >= N_RCPTS, 30)
            assert sorted(_reported(tmp_path, qid)) == sorted(rcpts)  # every recipient exactly once
            assert remote.rcpts >= N_RCPTS
    finally:
        remote.close()


def test_the_refusing_mx_lab_server_stops_when_closed():
    # The lab's RefusingMX must not outlive its test: a thread left blocked in accept() kept its
    # port listening, and later answered "220 mx.refuse.test" on another test's listening socket
    # that reused the descriptor number (the MTA-STS policy fetch in test_dns_records14 then failed
    # with WRONG_VERSION_NUMBER about one full run in two).
    import socket

    mx = RefusingMX("127.0.0.1", expect=1)
    with socket.create_connection(("127.0.0.1", mx.port), timeout=5) as c:
        assert c.recv(100).startswith(b"220 ")
    mx.close()
    assert not mx.thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", mx.port), timeout=2).close()
