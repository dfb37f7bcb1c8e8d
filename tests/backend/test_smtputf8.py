"""SMTPUTF8 on the way out (RFC 6531): negotiated with a remote that offers it, 5.6.7 bounce and a DSN when it does not.

Real aiosmtpd receivers on loopback (one with ``enable_SMTPUTF8``, one without), the real zone from
test_delivery's nsd, and the queue/runner harness on an injected clock.
"""

from __future__ import annotations

import subprocess

import aiosmtplib
import pytest

from backend.queue.model import BOUNCED, DEFERRED, DELIVERED
from tests.backend.helpers import wait_for
from tests.lab.delivery_fixtures import ca, dns_server, maildir_messages, make, parse_dsn, receivers  # noqa: F401 - fixtures
from tests.lab.delivery import Sink

SMTPUTF8_MX = "127.0.0.11"  # dest.test
ASCII_MX = "127.0.0.14"  # amx.test (implicit MX)


def utf8_message(sender: str, rcpts: list[str], subject: str = "Grüße aus Köln") -> bytes:
    # RFC 6532: internationalised headers are raw UTF-8 (no encoded words).
    return (
        f"From: <{sender}>\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
        f"Message-ID: <u8@example.org>\r\n\r\nHallo.\r\n"
    ).encode("utf-8")


@pytest.mark.asyncio
async def test_utf8_addresses_and_headers_reach_a_remote_that_offers_smtputf8(make, receivers):
    sink = await receivers.start(SMTPUTF8_MX, Sink(), smtputf8=True)
    h = make()
    content = utf8_message("jösé@example.org", ["bøb@dest.test"])
    qid = h.submit("jösé@example.org", ["bøb@dest.test", "carol@dest.test"], content=content)
    await h.round()
    assert {a: s for a, (s, _) in h.states(qid).items()} == {"bøb@dest.test": DELIVERED, "carol@dest.test": DELIVERED}
    (got,) = sink.messages
    assert got.sender == "jösé@example.org"
    assert got.rcpts == ["bøb@dest.test", "carol@dest.test"]
    assert "SMTPUTF8" in [o.upper() for o in got.mail_options]  # RFC 6531 3.4: MAIL FROM ... SMTPUTF8
    assert "Subject: Grüße aus Köln".encode() in got.content
    assert h.others(qid) == []


@pytest.mark.asyncio
async def test_utf8_headers_alone_ask_for_smtputf8(make, receivers):
    sink = await receivers.start(SMTPUTF8_MX, Sink(), smtputf8=True)
    h = make()
    qid = h.submit("alice@example.org", ["bob@dest.test"], content=utf8_message("alice@example.org", ["bob@dest.test"]))
    await h.round()
    assert h.states(qid)["bob@dest.test"][0] == DELIVERED
    assert "SMTPUTF8" in [o.upper() for o in sink.messages[0].mail_options]


@pytest.mark.asyncio
async def test_utf8_recipient_at_a_remote_without_smtputf8_bounces_with_5_6_7_and_a_dsn(make, receivers):
    sink = await receivers.start(ASCII_MX, Sink())  # no SMTPUTF8 in its EHLO
    h = make()
    ascii_headers = b"From: <alice@example.org>\r\nTo: undisclosed-recipients:;\r\nSubject: hi\r\n\r\nbody\r\n"
    qid = h.submit("alice@example.org", ["bøb@amx.test", "carol@amx.test"], content=ascii_headers)
    await h.round()
    states = h.states(qid)
    state, reply = states["bøb@amx.test"]
    assert state == BOUNCED and reply.startswith("554 5.6.7 "), reply
    # The ASCII recipient of the same transaction does not need SMTPUTF8 and is delivered.
    assert states["carol@amx.test"][0] == DELIVERED
    (got,) = sink.messages
    assert got.rcpts == ["carol@amx.test"]
    assert "SMTPUTF8" not in [o.upper() for o in got.mail_options]
    (report,) = h.others(qid)
    assert report.sender == "" and [r.address for r in report.recipients] == ["alice@example.org"]
    await h.round()  # the report reaches alice's Maildir
    (raw,) = maildir_messages(h, "alice@example.org")
    _, _, (f,), _ = parse_dsn(raw)
    assert f["Action"] == "failed" and f["Status"] == "5.6.7"
    assert f["Final-Recipient"] == "utf-8;b\\x{F8}b@amx.test"  # RFC 6533 utf-8-addr-xtext


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "sender, content",
    [
        ("jösé@example.org", None),  # UTF-8 envelope sender
        ("alice@example.org", utf8_message("alice@example.org", ["bob@amx.test"])),  # UTF-8 header only
    ],
)
async def test_a_message_that_needs_smtputf8_bounces_entirely_at_a_remote_without_it(make, receivers, sender, content):
    sink = await receivers.start(ASCII_MX, Sink())
    h = make()
    qid = h.submit(sender, ["bob@amx.test"], content=content)
    await h.round()
    state, reply = h.states(qid)["bob@amx.test"]
    assert state == BOUNCED and reply.startswith("554 5.6.7 "), reply
    assert sink.mail_commands == 0  # nothing was sent that the server could not take
    (report,) = h.others(qid)
    assert [r.address for r in report.recipients] == [sender]


@pytest.mark.asyncio
async def test_legacy_8bit_headers_are_not_utf8_and_go_out_as_before(make, receivers):
    sink = await receivers.start(ASCII_MX, Sink())
    h = make()
    latin1 = b"From: <alice@example.org>\r\nSubject: Gr\xfc\xdfe\r\n\r\nbody\r\n"  # not valid UTF-8
    qid = h.submit("alice@example.org", ["bob@amx.test"], content=latin1)
    await h.round()
    assert h.states(qid)["bob@amx.test"][0] == DELIVERED
    assert "SMTPUTF8" not in [o.upper() for o in sink.messages[0].mail_options]


def _established_to(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return len([line for line in out.splitlines() if line.strip()])


@pytest.mark.asyncio
async def test_an_unexpected_error_mid_transaction_defers_and_discards_the_session(make, receivers, monkeypatch):
    """No exception type escapes outcome handling: the recipient is deferred with a reason, and the
    session (now in an unknown state) is closed rather than leaked or pooled.

    The fault is injected (a bug cannot be made real): RCPT raises an exception no handler expects.
    """
    sink = await receivers.start(SMTPUTF8_MX, Sink())
    h = make()
    real_rcpt = aiosmtplib.SMTP.rcpt

    async def broken_rcpt(self, recipient, **kw):
        raise LookupError("injected bug")

    monkeypatch.setattr(aiosmtplib.SMTP, "rcpt", broken_rcpt)
    qid = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    state, reply = h.states(qid)["bob@dest.test"]
    assert state == DEFERRED and reply == "451 4.3.0 Local error during delivery: LookupError", reply
    assert sink.mail_commands == 1
    await wait_for(lambda: _established_to(receivers.port) == 0, 10)  # the session was closed
    monkeypatch.setattr(aiosmtplib.SMTP, "rcpt", real_rcpt)
    h.clock.advance(300)
    await h.round()  # the next attempt opens a fresh session and delivers
    assert h.states(qid)["bob@dest.test"][0] == DELIVERED
    assert sink.connections == 2
