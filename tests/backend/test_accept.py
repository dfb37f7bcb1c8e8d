"""The accept pipeline (backend/accept.py) called directly, without SMTP: what any front end (the
HTTP send API, a local sendmail) gets. The message is queued, signed, traced; policy refusals and
local faults come back as replies; and the SMTP listeners reach the same code."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import pytest

from backend.accept import LAN, MX, SUBMISSION, Incoming, Refused
from backend.dkim import keys as dkim_keys
from backend.queue.model import NewRecipient
from backend.queue.store import Queue
from tests.backend.helpers import ALICE, listener_block, running_backend, write_config
from tests.lab.dkim import sig_tags, verify_all

BODY = b"From: alice@example.org\r\nTo: friend@remote.example\r\nSubject: direct\r\n\r\nhello\r\n"


def incoming(kind: str, content: bytes = BODY, **kw) -> Incoming:
    base = dict(
        listener="api",
        kind=kind,
        sender=ALICE,
        recipients=(NewRecipient(address="friend@remote.example", orig_address="friend@remote.example", local=False),),
        content=content,
        client_addr="192.0.2.7",
        helo="app.example",
        protocol="ESMTPA",
        auth_user=ALICE,
        rcpt_to=("friend@remote.example",),
    )
    base.update(kw)
    return Incoming(**base)


def fields(message: bytes, name: str) -> list[str]:
    header = message.partition(b"\r\n\r\n")[0].decode()
    unfolded = re.sub(r"\r\n[ \t]", " ", header)
    return [line.split(":", 1)[1].strip() for line in unfolded.split("\r\n") if line.lower().startswith(name.lower() + ":")]


@pytest.fixture
def dkim_config(tmp_path):
    g = dkim_keys.generate_key("example.org", "s1", "ed25519", tmp_path)
    keys = {"ed25519": (SimpleNamespace(domain="example.org", selector="s1", algorithm="ed25519", private_key=g.path),
                        g.txt_value)}
    extra = f'[[dkim]]\ndomain = "example.org"\nselector = "s1"\nalgorithm = "ed25519"\nprivate_key = "{g.path}"\n'
    return keys, write_config(tmp_path, listener_block("mx", "mx"), extra=extra)


@pytest.mark.asyncio
async def test_a_direct_call_queues_the_message_signed_and_traced(dkim_config):
    keys, cfg = dkim_config
    async with running_backend(cfg) as b:
        qid = await b.acceptor.accept(incoming(SUBMISSION))
        q = Queue(b.config.queue_db, group_commit=False)
        [entry] = [e for e in q.list(None) if e.id == qid]
        stored = q.content(qid)
    assert entry.sender == ALICE and [r.address for r in entry.recipients] == ["friend@remote.example"]
    [received] = fields(stored, "Received")
    assert received.startswith("from app.example ([192.0.2.7])") and f"with ESMTPA id {qid}" in received
    assert "for <friend@remote.example>" in received
    assert fields(stored, "Date") and fields(stored, "Message-ID")  # RFC 6409 8.2-8.3 on submission
    [tags] = sig_tags(stored)
    assert tags["d"] == "example.org" and tags["s"] == "s1"
    assert verify_all(stored, keys) == [True]
    assert stored.endswith(BODY.partition(b"\r\n\r\n")[2])


@pytest.mark.asyncio
async def test_mx_mail_is_traced_but_neither_signed_nor_given_submission_fields(dkim_config):
    _, cfg = dkim_config
    async with running_backend(cfg) as b:
        qid = await b.acceptor.accept(incoming(MX, b"Subject: no date\r\n\r\nx\r\n", auth_user=None, protocol="ESMTP"))
        stored = Queue(b.config.queue_db, group_commit=False).content(qid)
    assert fields(stored, "Received") and not fields(stored, "DKIM-Signature")
    assert not fields(stored, "Date") and not fields(stored, "Message-ID")


@pytest.mark.asyncio
async def test_policy_refusals_come_back_as_replies_and_nothing_is_queued(dkim_config):
    _, cfg = dkim_config
    loop = b"".join(b"Received: from x by y; Mon, 1 Jan 2024 00:00:00 +0000\r\n" for _ in range(40)) + BODY
    async with running_backend(cfg) as b:
        with pytest.raises(Refused) as e:
            await b.acceptor.accept(incoming(MX, loop, auth_user=None))
        assert e.value.reply.startswith("554 5.4.6") and e.value.reason == "mail_loop"
        with pytest.raises(Refused) as e:
            await b.acceptor.accept(incoming(LAN, b"Subject: no from\r\n\r\nx\r\n", auth_user=None))
        assert e.value.reply.startswith("550") and e.value.reason == "from_not_allowed"
        spoof = BODY.replace(b"From: alice@example.org", b"From: bob@example.org")
        with pytest.raises(Refused) as e:
            await b.acceptor.accept(incoming(SUBMISSION, spoof))
        assert e.value.reply.startswith("553")
        assert Queue(b.config.queue_db, group_commit=False).list(None) == []
        refused = b.metrics.registry.get_sample_value(
            "homemx_backend_messages_received_total", {"listener": "api", "result": "rejected"})
        assert refused == 3


@pytest.mark.asyncio
async def test_a_queue_that_cannot_store_answers_451_without_a_traceback(dkim_config, caplog):
    _, cfg = dkim_config
    async with running_backend(cfg) as b:
        b.queue.close()  # a queue that refuses writes (its writer stopped): QueueClosed
        with pytest.raises(Refused) as e:
            await b.acceptor.accept(incoming(SUBMISSION))
    assert e.value.reply.startswith("451 4.3.0")
    assert "Traceback" not in caplog.text


@pytest.mark.asyncio
async def test_every_smtp_listener_goes_through_the_accept_pipeline(dkim_config, monkeypatch):
    """The listeners call Acceptor.accept at the dot: a pipeline that refuses everything refuses
    mail on mx, submission and lan alike."""
    import smtplib

    from backend.accept import Acceptor
    from backend.smtp import replies as R
    from tests.backend.helpers import ALICE_PW, client_tls

    _, cfg = dkim_config
    text = cfg.read_text()
    extra_listeners = listener_block("sub", "submission") + listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"])
    cfg.write_text(text + "\n" + extra_listeners)
    calls = []

    async def refuse(self, m, started=None):
        calls.append(m.kind)
        raise Refused(R.R451_LOCAL_ERROR, "test")

    monkeypatch.setattr(Acceptor, "accept", refuse)
    async with running_backend(cfg) as b:

        def send(port, login):
            s = smtplib.SMTP("127.0.0.1", port, timeout=10)
            s.ehlo("app.example")
            if login:
                s.starttls(context=client_tls())
                s.ehlo("app.example")
                s.login(ALICE, ALICE_PW)
            sender = ALICE if login or port == b.bound_port("lan") else "carol@remote.example"
            try:
                return s.sendmail(sender, [ALICE], BODY)
            except smtplib.SMTPDataError as e:
                return e.smtp_code
            finally:
                s.quit()

        codes = [await asyncio.to_thread(send, b.bound_port(n), n == "sub") for n in ("mx", "sub", "lan")]
    assert codes == [451, 451, 451] and calls == ["mx", "submission", "lan"]


@pytest.mark.asyncio
async def test_a_folded_from_header_is_read_whole_accepted_and_signed(dkim_config):
    """RFC 5322 2.2.3 folding: 'From: Alice' CRLF ' <alice@example.org>' is one field. Its first
    line alone ('Alice') was taken for the address: submission answered 553 and the signer found
    no key for the message."""
    keys, cfg = dkim_config
    folded = BODY.replace(b"From: alice@example.org", b"From: Alice Example\r\n <alice@example.org>")
    async with running_backend(cfg) as b:
        qid = await b.acceptor.accept(incoming(SUBMISSION, folded))
        stored = Queue(b.config.queue_db, group_commit=False).content(qid)
    assert fields(stored, "DKIM-Signature") and verify_all(stored, keys) == [True]
