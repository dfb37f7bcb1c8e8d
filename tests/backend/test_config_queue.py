"""Config validation (errors name file, key and reason) and queue semantics (pure storage, no sockets)."""

from __future__ import annotations

import concurrent.futures
import os

import pytest

from backend.config import ConfigError, load_config
from backend.queue.model import BOUNCED, DEFERRED, DELIVERED, NewMessage, NewRecipient
from backend.queue.store import Queue
from tests.backend.helpers import listener_block, run_cli, write_config


def _cfg(tmp_path, listeners=None, extra=""):
    return write_config(tmp_path, listeners or listener_block("mx", "mx"), extra=extra)


@pytest.mark.parametrize(
    "edit,key,reason",
    [
        (lambda t: t.replace("[server]\n", "[server]\nhostnmae = \"x\"\n"), "server.hostnmae", "unknown key"),
        (lambda t: t + "\n[surprise]\n", "surprise", "unknown key"),
        (lambda t: t.replace('listen = "127.0.0.1:0"', 'listen = "999.1.1.1:25"'), "listener[0].listen", "not an IP address"),
        (lambda t: t.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:99999"'), "listener[0].listen", "bad port"),
        (lambda t: t.replace('kind = "mx"', 'kind = "mxx"'), "listener[0].kind", "expected one of"),
        (lambda t: t.replace("cert.pem", "missing.pem"), "tls.cert", "cannot read"),
        (lambda t: t.replace("dns_port = 9", 'dns_port = 9\nretry_schedule = ["5 minutes"]'), "delivery.retry_schedule", "duration"),
        (lambda t: t + "\n[[listener]]\nname = \"p\"\nkind = \"mx\"\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\n",
         "listener[1].trusted_proxies", "trusted proxy"),
    ],
)
def test_config_errors_name_file_key_reason(tmp_path, edit, key, reason):
    path = _cfg(tmp_path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.file == str(path) and e.value.key == key and reason in e.value.reason
    # The CLI prints exactly one line with all three and exits non-zero, before binding anything.
    r = run_cli("config", "check", "-c", str(path))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and key in lines[0] and reason in lines[0]


def test_config_check_ok_and_unreadable_file(tmp_path):
    path = _cfg(tmp_path)
    r = run_cli("config", "check", "-c", str(path))
    assert r.returncode == 0 and "ok" in r.stdout
    r = run_cli("config", "check", "-c", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "nope.toml" in r.stderr and "cannot read" in r.stderr


def _msg(n_rcpt=1, local=False, sender="a@example.org"):
    return NewMessage(sender, tuple(NewRecipient(f"r{i}@remote.example", f"r{i}@remote.example", local) for i in range(n_rcpt)),
                      b"Subject: x\r\n\r\nbody\r\n", "lan")


def test_claim_moves_next_attempt_before_attempt(tmp_path):
    clock = [1000.0]
    q = Queue(tmp_path / "q.db", now=lambda: clock[0])
    qid = q.enqueue(_msg(2))
    claimed = q.claim_due(10, lambda attempts: 300 * (attempts + 1))
    assert [r.attempts for r in claimed] == [1, 1]
    # A crash now (nothing recorded) must not make them due again immediately.
    assert q.claim_due(10, lambda a: 300) == []
    clock[0] += 299
    assert q.claim_due(10, lambda a: 300) == []
    clock[0] += 2
    again = q.claim_due(10, lambda a: 600)
    assert [r.attempts for r in again] == [2, 2]
    q.set_result(again[0].id, DELIVERED, "250 ok")
    q.set_result(again[1].id, BOUNCED, "550 no")
    e = q.get(qid)
    assert [r.state for r in e.recipients] == [DELIVERED, BOUNCED]
    q.close()


def test_hold_release_retry_delete_and_purge(tmp_path):
    clock = [1000.0]
    q = Queue(tmp_path / "q.db", now=lambda: clock[0])
    qid = q.enqueue(_msg())
    assert q.hold(qid) == 1
    assert q.claim_due(10, lambda a: 60) == []  # held: never attempted
    assert q.release(qid) == 1
    [r] = q.claim_due(10, lambda a: 60)
    q.set_result(r.id, DEFERRED, "451 later", next_attempt=clock[0] + 3600)
    assert q.retry(qid) == 1
    assert len(q.claim_due(10, lambda a: 60)) == 1
    q.set_result(r.id, DELIVERED, "250")
    clock[0] += 100
    assert q.purge_final(keep_for=1000) == 0  # still visible for keep_final
    clock[0] += 1000
    assert q.purge_final(keep_for=1000) == 1
    with pytest.raises(Exception, match=qid):
        q.delete(qid)
    q.close()


def test_group_commit_many_concurrent_enqueues(tmp_path):
    q = Queue(tmp_path / "q.db")
    with concurrent.futures.ThreadPoolExecutor(20) as ex:
        ids = list(ex.map(lambda i: q.enqueue(_msg()), range(200)))
    assert len(set(ids)) == 200
    assert len(q.list()) == 200
    assert q.stats()[0]["queued"] == 200
    q.close()
    # Durable on disk: a fresh handle (as after a restart) sees everything.
    assert len(Queue(tmp_path / "q.db", group_commit=False).list()) == 200
    assert os.path.exists(tmp_path / "q.db")


def test_large_bodies_spooled_to_files_and_cleaned_up(tmp_path):
    q = Queue(tmp_path / "q.db")
    big = NewMessage("a@example.org", (NewRecipient("r@remote.example", "r@remote.example", False),),
                     b"Subject: big\r\n\r\n" + b"z" * (Queue.SPOOL_THRESHOLD + 10), "lan")
    spooled = q.spool_large(big)
    assert spooled.spool and (tmp_path / "spool" / spooled.spool).read_bytes() == big.content
    assert q.spool_large(_msg()).spool is None  # small bodies stay in the database
    qid = q.enqueue(spooled)
    assert q.content(qid) == big.content and q.get(qid).size == len(big.content)
    # The body is not in the database (only the record is committed through the group writer).
    import sqlite3

    assert sqlite3.connect(tmp_path / "q.db").execute("SELECT length(content) FROM message").fetchone()[0] == 0
    # A body whose record never committed (crash before the 250) is an orphan: removed at start.
    (tmp_path / "spool" / "ORPHAN").write_bytes(b"x")
    (tmp_path / "spool" / "ORPHAN2.tmp").write_bytes(b"x")
    assert q.remove_orphans() == 2 and (tmp_path / "spool" / spooled.spool).exists()
    q.delete(qid)
    assert not (tmp_path / "spool" / spooled.spool).exists()
    q.close()


def test_claim_never_returns_recipients_still_in_flight(tmp_path):
    clock = [1000.0]
    q = Queue(tmp_path / "q.db", now=lambda: clock[0])
    q.enqueue(_msg(2))
    first = q.claim_due(10, lambda a: 2)
    clock[0] += 5  # the attempt outlives its retry delay
    assert q.claim_due(10, lambda a: 2, exclude=frozenset(r.id for r in first)) == []
    assert len(q.claim_due(10, lambda a: 2)) == 2  # once finished (not excluded) they are due again
    q.close()


@pytest.mark.asyncio
async def test_runner_does_not_start_a_second_attempt_while_one_runs(tmp_path):
    """The double delivery the namespace lab found: an attempt slower than the retry delay."""
    import asyncio

    from backend.config import load_config
    from backend.metrics import BackendMetrics
    from backend.queue.runner import QueueRunner

    cfg = load_config(_cfg(tmp_path, extra=""))
    clock = [1000.0]
    q = Queue(tmp_path / "q.db", now=lambda: clock[0])
    release, started = asyncio.Event(), asyncio.Event()
    calls: list[tuple[str, list[int]]] = []

    class SlowRemote:  # stands in for a remote MX that takes longer than the retry delay to answer
        async def deliver(self, message_id, recipients):
            calls.append((message_id, [r.id for r in recipients]))
            started.set()
            await release.wait()
            for r in recipients:
                await asyncio.to_thread(q.set_result, r.id, DELIVERED, "250 ok")

    async def run_blocking(fn, *args):
        return await asyncio.to_thread(fn, *args)

    runner = QueueRunner(cfg, q, BackendMetrics(), run_blocking, remote=SlowRemote(), now=lambda: clock[0])
    runner.retry_delay = lambda attempts: 2.0
    qid = q.enqueue(_msg(2))
    await runner.run_once()
    await asyncio.wait_for(started.wait(), 10)  # the attempt is under way at the "remote"
    clock[0] += 10  # well past the planned retry, the first attempt still running
    await runner.run_once()
    # The second pass claimed nothing: the rows still show one attempt (a claim counts it).
    assert [r.attempts for r in q.get(qid).recipients] == [1, 1]
    release.set()
    await runner.drain(5)
    assert len(calls) == 1
    assert [r.state for r in q.get(qid).recipients] == [DELIVERED, DELIVERED]
    clock[0] += 10
    await runner.run_once()
    await runner.drain(5)
    assert len(calls) == 1  # delivered: nothing left to attempt
    q.close()
