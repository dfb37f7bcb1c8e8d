"""Delivery webhooks of the HTTP send API (issue 18): the queue records which API key sent a
message, and the outcomes of such messages become signed events POSTed to the key's webhook.

Real sockets throughout: a real aiohttp receiver on loopback that checks each signature the way
docs/api.md tells receivers to, a real backend (in this process, or a `homemx-backend run`
process for the crash test) delivering into its Maildir or to a refusing MX found through a real
nsd. Retry timing is made short through the [api] webhook settings, never by sleeping."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from backend.http import webhooks
from backend.http.apikeys import KeyStore
from backend.http.webhooks import signature, verify_signature, webhook_status
from backend.queue.model import BOUNCED, DELIVERED, NewMessage, NewRecipient
from backend.queue.store import Queue
from tests.backend.helpers import ALICE, DOMAIN, listener_block, maildir_files, running_backend, wait_for, write_config
from tests.conftest import require_tool
from tests.lab.backend import Daemon, daemons, queue_db  # noqa: F401 - fixture
from tests.lab.nsd import NSD, zone_text
from tests.lab.ports import free_port
from tests.lab.refusing_mx import RefusingMX

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


# ---------------------------------------------------------------- the webhook receiver and the backend

REFUSING_MX = "127.0.0.43"
DOCS_API = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def documented_verify():
    """The ``verify`` function of docs/api.md "Verifying a webhook", as a receiver would copy it."""
    text = DOCS_API.read_text()
    [code] = [block.split("\n", 1)[1] for block in text.split("```python")[1:]
              if block.split("\n", 1)[1].startswith("# homemx webhook verification")]
    namespace: dict = {}
    exec(code.split("```", 1)[0], namespace)  # noqa: S102 - our own documentation
    return namespace["verify"]


class Receiver:
    """A webhook receiver on loopback, verifying each request with the snippet docs/api.md gives
    receivers (not with backend code): HMAC-SHA256 of "<Homemx-Timestamp>.<raw body>" with the
    key's secret, a timestamp within 5 minutes.

    ``hang``: requests are read, then never answered (a receiver that hangs)."""

    def __init__(self, secret: str, port: int | None = None):
        self.secret = secret
        self.port = port or free_port()
        self.events: list[dict] = []  # verified and answered 200
        self.arrived: list[dict] = []  # every request, answered or not
        self.refused = 0
        self.hang = False
        self.arrival = asyncio.Event()
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.verify = documented_verify()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/mail?app=1"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ts, sig = request.headers.get("Homemx-Timestamp", ""), request.headers.get("Homemx-Signature", "")
        if not (self.verify(self.secret, ts, sig, body) and request.content_type == "application/json"):
            self.refused += 1
            return web.Response(status=401)
        event = json.loads(body)
        self.arrived.append(event)
        self.arrival.set()
        if self.hang:
            await self.release.wait()  # never set in the hanging tests: the sender's timeout ends it
        self.events.append(event)
        return web.Response(status=204)

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hooks/mail", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            self.release.set()
            await self._runner.cleanup()


def api_config(tmp_path: Path, *, extra: str = "", schedule: str = '["10s"]', timeout: str = "10s") -> Path:
    return write_config(
        tmp_path, listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]),
        extra=(f'[api]\nenabled = true\nlisten = "127.0.0.1:0"\nwebhook_retry_schedule = {schedule}\n'
               f'webhook_timeout = "{timeout}"\n' + extra),
    )


def make_key(tmp_path: Path, webhook_url: str | None, with_token: bool = False):
    """A key as ``apikey create`` makes it: (id, webhook secret), and its token when asked."""
    store = KeyStore(tmp_path / "data" / "apikeys.sqlite3")
    try:
        key, token, secret = store.create("app", [f"@{DOMAIN}"], webhook_url=webhook_url)
    finally:
        store.close()
    return (key.id, secret, token) if with_token else (key.id, secret)


def message(api_key: str | None, rcpt: str = ALICE, local: bool = True, subject: str = "hello") -> NewMessage:
    return NewMessage(f"app@{DOMAIN}", (NewRecipient(rcpt, rcpt, local),),
                      f"From: app@{DOMAIN}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode(), "api",
                      api_key=api_key)


def sample(b, name: str, **labels) -> float:
    return b.metrics.registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------- signing (pure)


def test_the_signature_verifies_and_a_replayed_or_altered_request_does_not():
    body = b'{"id":"evt_1","event":"delivered"}'
    sig = signature("whsec_x", 1_800_000_000, body)
    assert sig == "v1=" + hmac.new(b"whsec_x", b"1800000000." + body, hashlib.sha256).hexdigest()
    assert verify_signature("whsec_x", "1800000000", sig, body, now=1_800_000_100)
    assert verify_signature("whsec_x", "1800000000", "v1=00, " + sig, body, now=1_800_000_100)  # a rotated secret
    assert not verify_signature("whsec_x", "1800000000", sig, body, now=1_800_000_301)  # replayed 5 min later
    assert not verify_signature("whsec_x", "1800000000", sig, body + b" ", now=1_800_000_000)  # altered body
    assert not verify_signature("whsec_y", "1800000000", sig, body, now=1_800_000_000)  # another key's secret
    assert not verify_signature("whsec_x", "1800000001", sig, body, now=1_800_000_000)  # another timestamp


# ---------------------------------------------------------------- events in the outcome's commit


def test_an_outcome_and_its_event_are_one_commit_and_only_api_messages_get_events(tmp_path, monkeypatch):
    q = Queue(tmp_path / "queue.sqlite3", group_commit=False)
    try:
        api = q.enqueue(message("key_1"))
        smtp = q.enqueue(message(None))
        held = q.enqueue(message("key_1", subject="held"))
        q.hold(held)
        rcpts = {r.message_id: r for r in q.claim_due(10, lambda n: 60.0)}
        [held_rcpt] = q.get(held).recipients

        # The commit fails after the event was written (a fault of the disk at COMMIT cannot be
        # made on demand here; the transaction is what matters): neither the outcome nor its event
        # is stored.
        record_events = webhooks.record_events

        def then_fail(conn, now, outcomes):
            record_events(conn, now, outcomes)
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(webhooks, "record_events", then_fail)
        with pytest.raises(sqlite3.OperationalError):
            q.set_result(rcpts[api].id, DELIVERED, "250 2.0.0 Delivered to Maildir")
        monkeypatch.setattr(webhooks, "record_events", record_events)
        assert q.get(api).recipients[0].state == "queued" and webhook_status(q, api) == []

        q.record_outcomes([(rcpts[api].id, DELIVERED, "250 2.0.0 Delivered to Maildir", None),
                           (rcpts[smtp].id, DELIVERED, "250 2.0.0 Delivered to Maildir", None),
                           (held_rcpt.id, BOUNCED, "550 5.1.1 no", None)])
        [event] = webhook_status(q, api)
        assert event["event"] == DELIVERED and event["state"] == "pending" and event["recipient"] == ALICE
        assert webhook_status(q, smtp) == []  # not sent through the API
        assert webhook_status(q, held) == []  # held: its state did not change
    finally:
        q.close()


# ---------------------------------------------------------------- through a running backend


@pytest.mark.asyncio
async def test_a_delivered_message_sends_a_signed_delivered_event_and_a_key_without_webhook_none(tmp_path):
    receiver = Receiver("")
    key, secret = make_key(tmp_path, receiver.url)
    receiver.secret = secret
    quiet_key, _ = make_key(tmp_path, None)
    await receiver.start()
    try:
        async with running_backend(api_config(tmp_path)) as b:
            qid = await b.run_blocking(b.queue.enqueue, message(key))
            quiet = await b.run_blocking(b.queue.enqueue, message(quiet_key, subject="quiet"))
            [event] = await wait_for(lambda: receiver.events)
            assert len(maildir_files(tmp_path, ALICE)) == 2
            assert event["event"] == "delivered" and event["message_id"] == qid and event["recipient"] == ALICE
            assert event["reply"] == "250 2.0.0 Delivered to Maildir" and event["attempts"] == 1
            assert event["id"].startswith("evt_") and abs(event["timestamp"] - time.time()) < 60
            [status] = await wait_for(lambda: [s for s in webhook_status(b.queue, qid) if s["state"] == "sent"])
            assert status["id"] == event["id"] and status["attempts"] == 1 and status["last_error"] is None
            # The key without a webhook: its event is dropped when it is due, nothing is POSTed.
            await wait_for(lambda: webhook_status(b.queue, quiet) == [])
            assert sample(b, "homemx_backend_webhook_deliveries_total", key=key, result="sent") == 1
            assert sample(b, "homemx_backend_webhook_deliveries_total", key=quiet_key, result="sent") == 0
            await wait_for(lambda: sample(b, "homemx_backend_webhook_pending") == 0)
        assert receiver.refused == 0 and len(receiver.events) == 1
    finally:
        await receiver.stop()


@pytest.mark.asyncio
async def test_a_bounced_remote_recipient_sends_a_bounced_event(tmp_path):
    require_tool("/usr/sbin/nsd")
    receiver = Receiver("")
    key, receiver.secret = make_key(tmp_path, receiver.url)
    await receiver.start()
    remote = RefusingMX(REFUSING_MX, 1)
    zone = zone_text("refuse.test", f"@ IN MX 10 mx\nmx IN A {REFUSING_MX}\n")
    try:
        with NSD({"refuse.test": zone}) as ns:
            cfg = api_config(tmp_path, extra=(
                f'[delivery]\nnameservers = ["{ns.address}"]\ndns_port = {ns.port}\n'
                f'remote_port = {remote.port}\nmta_sts = false\n'))
            async with running_backend(cfg) as b:
                qid = await b.run_blocking(b.queue.enqueue, message(key, "nobody@refuse.test", local=False))
                events = await wait_for(lambda: [e for e in receiver.events if e["message_id"] == qid], 30)
                assert [e["event"] for e in events] == ["bounced"]
                assert events[0]["recipient"] == "nobody@refuse.test"
                assert events[0]["reply"].startswith("550 5.1.1")
                assert b.queue.get(qid).recipients[0].state == BOUNCED
    finally:
        remote.close()
        await receiver.stop()


@pytest.mark.asyncio
async def test_a_receiver_that_is_down_gets_the_event_once_it_is_back(tmp_path):
    receiver = Receiver("")  # its port is chosen, nothing listens there yet
    key, receiver.secret = make_key(tmp_path, receiver.url)
    try:
        async with running_backend(api_config(tmp_path, schedule='["100ms"]')) as b:
            qid = await b.run_blocking(b.queue.enqueue, message(key))
            # Refused, and tried again on the (test's short) schedule; the mail itself is delivered.
            [status] = await wait_for(lambda: [s for s in webhook_status(b.queue, qid) if s["attempts"] >= 3])
            assert status["state"] == "pending" and status["last_error"].startswith("cannot connect")
            assert maildir_files(tmp_path, ALICE)
            assert sample(b, "homemx_backend_webhook_deliveries_total", key=key, result="retry") >= 2
            assert sample(b, "homemx_backend_webhook_pending") == 1

            await receiver.start()
            [event] = await wait_for(lambda: receiver.events)
            assert event["message_id"] == qid and event["event"] == "delivered"
            [status] = await wait_for(lambda: [s for s in webhook_status(b.queue, qid) if s["state"] == "sent"])
            assert status["attempts"] >= 4 and status["delivered_at"] is not None
    finally:
        await receiver.stop()


@pytest.mark.asyncio
async def test_an_event_is_given_up_after_its_time_and_the_failure_is_recorded(tmp_path):
    receiver = Receiver("")
    key, _ = make_key(tmp_path, receiver.url)
    receiver.secret = "not-the-key-secret"  # every request is answered 401
    await receiver.start()
    try:
        cfg = api_config(tmp_path, schedule='["100ms"]', extra='webhook_give_up_after = "1s"\n')
        async with running_backend(cfg) as b:
            qid = await b.run_blocking(b.queue.enqueue, message(key))
            [status] = await wait_for(lambda: [s for s in webhook_status(b.queue, qid) if s["state"] == "failed"])
            assert status["last_error"] == "HTTP 401" and status["next_attempt"] is None
            assert sample(b, "homemx_backend_webhook_deliveries_total", key=key, result="gave_up") == 1
            attempts = status["attempts"]
            assert receiver.refused == attempts >= 2
    finally:
        await receiver.stop()


@pytest.mark.asyncio
async def test_a_hanging_receiver_does_not_hold_up_mail(tmp_path):
    receiver = Receiver("")
    key, receiver.secret = make_key(tmp_path, receiver.url)
    receiver.hang = True
    await receiver.start()
    try:
        async with running_backend(api_config(tmp_path, timeout="60s")) as b:
            first = await b.run_blocking(b.queue.enqueue, message(key, subject="first"))
            await wait_for(receiver.arrival.is_set)  # its event's POST is under way, unanswered
            second = await b.run_blocking(b.queue.enqueue, message(key, subject="second"))
            await wait_for(lambda: len(maildir_files(tmp_path, ALICE)) == 2)
            assert b.queue.get(second).recipients[0].state == DELIVERED
            # The first event's POST still hangs while the next message was delivered.
            [status] = webhook_status(b.queue, first)
            assert status["state"] == "pending" and status["attempts"] == 1 and not receiver.events
    finally:
        await receiver.stop()


@pytest.mark.asyncio
async def test_a_message_posted_to_the_api_gets_its_event_with_its_tags_and_the_status_shows_it(tmp_path):
    receiver = Receiver("")
    key, receiver.secret, token = make_key(tmp_path, receiver.url, with_token=True)
    await receiver.start()
    try:
        async with running_backend(api_config(tmp_path)) as b:
            url = f"http://127.0.0.1:{b.api.bound_port()}/v1/messages"
            auth = {"Authorization": f"Bearer {token}"}
            doc = {"from": f"app@{DOMAIN}", "to": [ALICE], "subject": "backup", "text": "done\n", "tags": ["nightly"]}
            async with aiohttp.ClientSession() as s:
                async with s.post(url, json=doc, headers=auth) as r:
                    assert r.status == 202, await r.text()
                    qid = (await r.json())["id"]
                [event] = await wait_for(lambda: receiver.events)
                assert event["message_id"] == qid and event["event"] == "delivered" and event["tags"] == ["nightly"]
                await wait_for(lambda: webhook_status(b.queue, qid)[0]["state"] == "sent")
                async with s.get(f"{url}/{qid}", headers=auth) as r:
                    [hook] = (await r.json())["webhooks"]
            assert hook["id"] == event["id"] and hook["state"] == "sent" and hook["attempts"] == 1
            assert b.queue.get(qid).api_key == key
    finally:
        await receiver.stop()


@pytest.mark.asyncio
async def test_a_receiver_that_does_not_answer_in_time_is_cut_off_and_tried_again(tmp_path):
    receiver = Receiver("")
    key, receiver.secret = make_key(tmp_path, receiver.url)
    receiver.hang = True
    await receiver.start()
    try:
        async with running_backend(api_config(tmp_path, timeout="200ms", schedule='["100ms"]')) as b:
            qid = await b.run_blocking(b.queue.enqueue, message(key))
            [status] = await wait_for(lambda: [s for s in webhook_status(b.queue, qid) if s["attempts"] >= 2])
            assert status["state"] == "pending" and status["last_error"] == "no answer within 0.2 s"
            await wait_for(lambda: len(receiver.arrived) >= 2)  # the retry reached it too
            assert not receiver.events  # none was ever answered
    finally:
        await receiver.stop()


# ---------------------------------------------------------------- a crash between the outcome and the POST


@pytest.mark.asyncio
async def test_a_backend_killed_before_the_event_was_accepted_sends_it_after_restart(tmp_path, daemons):
    receiver = Receiver("")
    key, receiver.secret = make_key(tmp_path, receiver.url)
    receiver.hang = True  # the first POST is never answered: the backend dies before it is accepted
    await receiver.start()
    try:
        port = free_port()
        cfg = write_config(
            tmp_path, listener_block("lan", "lan", f"127.0.0.1:{port}", trusted_networks=["127.0.0.0/8"]),
            extra='[api]\nenabled = true\nlisten = "127.0.0.1:0"\nwebhook_retry_schedule = ["200ms"]\n'
                  'webhook_timeout = "60s"\n',
        )
        q = Queue(queue_db(tmp_path), group_commit=False)
        qid = q.enqueue(message(key))  # queued before the daemon starts: it delivers it at once
        q.close()
        d = await asyncio.to_thread(Daemon(cfg).start, port)
        daemons.append(d)
        await wait_for(receiver.arrival.is_set, 20)
        d.kill9()
        assert d.proc.returncode == -signal.SIGKILL

        # On disk: the recipient is delivered and its event is pending (written with the outcome).
        conn = sqlite3.connect(queue_db(tmp_path))
        [(state,)] = conn.execute("SELECT state FROM recipient WHERE message_id = ?", (qid,)).fetchall()
        assert state == DELIVERED
        [status] = webhook_status(conn, qid)
        conn.close()
        assert status["state"] == "pending" and status["id"] == receiver.arrived[0]["id"] and not receiver.events

        receiver.hang = False
        d2 = await asyncio.to_thread(Daemon(cfg).start, port)
        daemons.append(d2)
        [event] = await wait_for(lambda: receiver.events, 20)
        assert event["id"] == status["id"] and event["event"] == "delivered" and event["message_id"] == qid
        assert len(maildir_files(tmp_path, ALICE)) == 1  # the mail itself once
        conn = sqlite3.connect(queue_db(tmp_path))
        await wait_for(lambda: webhook_status(conn, qid)[0]["state"] == "sent")
        conn.close()
    finally:
        await receiver.stop()


def test_the_documented_verification_accepts_our_signature_and_refuses_a_replay():
    verify = documented_verify()
    body = b'{"id":"evt_1","event":"bounced"}'
    now = int(time.time())
    assert verify("whsec_x", str(now), signature("whsec_x", now, body), body)
    assert not verify("whsec_x", str(now - 301), signature("whsec_x", now - 301, body), body)  # replayed later
    assert not verify("whsec_x", str(now), signature("whsec_x", now, body), body.replace(b"bounced", b"delivered"))
    assert not verify("whsec_x", "", "", body)
