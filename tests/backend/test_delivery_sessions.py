"""Outbound SMTP sessions over real sockets: HELO fallback, the connection pool's idle expiry, and a
smarthost on implicit TLS (port 465 style) with AUTH.

Same lab as test_delivery.py (nsd on loopback, aiosmtpd receivers on 127.x addresses, a queue and
runner on an injected clock); every test asserts what a receiver saw or what the queue recorded.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from aiosmtpd.smtp import SMTP

from backend.queue import DEFERRED, DELIVERED
from tests.backend.test_delivery import SOURCE, ca, dns_server, make, policy_server, receivers  # noqa: F401 - fixtures
from tests.backend.test_delivery_lab import Clock, Sink


async def serve(receivers, address: str, factory) -> None:
    """Listen with ``factory`` on ``address`` at the receivers' port (the delivery.remote_port);
    the ``receivers`` fixture closes it."""
    server = await asyncio.get_running_loop().create_server(factory, address, receivers.port or 0)
    receivers.port = server.sockets[0].getsockname()[1]
    receivers.servers.append(server)


# ---------------------------------------------------------------- HELO fallback


@dataclass
class GreetingSink(Sink):
    """A Sink that also records the greeting commands it was sent, in order."""

    greetings: list[str] = field(default_factory=list)


class PreESMTPServer(SMTP):
    """An RFC 821 server: EHLO is an unknown command, HELO works."""

    ehlo_reply = "502 5.5.1 Command not implemented"

    async def smtp_EHLO(self, hostname: str):
        self.event_handler.greetings.append("EHLO")
        await self.push(self.ehlo_reply)

    async def smtp_HELO(self, hostname: str):
        self.event_handler.greetings.append("HELO")
        await super().smtp_HELO(hostname)


@pytest.mark.asyncio
@pytest.mark.parametrize("ehlo_reply", ["500 5.5.2 Syntax error, command unrecognized", "502 5.5.1 Command not implemented"])
async def test_a_server_that_refuses_ehlo_gets_helo_and_the_message(make, receivers, ehlo_reply):
    sink = GreetingSink()

    def factory():
        sink.connections += 1
        server = PreESMTPServer(sink, hostname="mx1.dest.test")
        server.ehlo_reply = ehlo_reply
        return server

    await serve(receivers, "127.0.0.11", factory)
    h = make()
    qid = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    # RFC 5321 3.2: a client SHOULD fall back to HELO when EHLO is not recognised.
    assert h.states(qid)["bob@dest.test"] == (DELIVERED, "250 2.0.0 OK accepted")
    assert sink.greetings == ["EHLO", "HELO"]
    (got,) = sink.messages
    assert got.rcpts == ["bob@dest.test"] and not got.tls
    assert got.mail_options == []  # no ESMTP parameters (SIZE, BODY) to a server that offers none
    assert sink.connections == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["tls_policy", "mta-sts enforce"])
async def test_a_server_that_refuses_ehlo_cannot_offer_starttls_so_required_tls_defers(make, receivers, policy_server, policy):
    # Without EHLO there is no STARTTLS: where TLS is required (configured, or an MTA-STS policy in
    # enforce mode) the HELO fallback would be a downgrade to cleartext (RFC 8461 5, RFC 3207).
    sink = GreetingSink()

    def factory():
        sink.connections += 1
        return PreESMTPServer(sink, hostname="mx.test")

    if policy == "tls_policy":
        await serve(receivers, "127.0.0.11", factory)
        h, rcpt = make(domain_tls_policy={"dest.test": "required"}), "bob@dest.test"
    else:
        await serve(receivers, "127.0.0.17", factory)  # mx.sts.test, named by sts.test's enforce policy
        h, rcpt = make(mta_sts=True, mta_sts_port=policy_server.port), "bob@sts.test"
    qid = h.submit("alice@example.org", [rcpt])
    await h.round()
    state, reply = h.states(qid)[rcpt]
    assert state == DEFERRED and reply.startswith("421 4.7.10 TLS required"), reply
    assert sink.greetings == ["EHLO"]  # no HELO, so no cleartext transaction
    assert sink.mail_commands == 0 and sink.messages == []


# ---------------------------------------------------------------- connection pool


@dataclass
class QuitSink(Sink):
    """A Sink that records which connections said QUIT (``Received.connection`` ids)."""

    quits: list[int] = field(default_factory=list)
    quit_seen: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_QUIT(self, server, session, envelope):
        self.quits.append(id(server))
        self.quit_seen.set()
        return "221 2.0.0 Bye"


@pytest.mark.asyncio
async def test_a_pooled_session_is_reused_within_its_idle_time_and_replaced_after_it(make, receivers):
    sink = await receivers.start("127.0.0.11", QuitSink())
    pool_clock = Clock(0.0)  # the pool's idle clock, moved by hand: no waiting
    h = make(deliverer_options={"monotonic": pool_clock, "pool_idle_timeout": 30.0})
    q1 = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    pool_clock.advance(29.0)  # idle for less than the pool's idle time: the session is reused
    q2 = h.submit("alice@example.org", ["carol@dest.test"])
    await h.round()
    assert sink.connections == 1 and sink.quits == []
    first = sink.messages[0].connection
    assert [m.connection for m in sink.messages] == [first, first]  # one connection, two transactions
    pool_clock.advance(30.0)  # idle since q2 for the whole idle time: expired
    q3 = h.submit("alice@example.org", ["dave@dest.test"])
    await h.round()
    assert [h.states(q)[a][0] for q, a in ((q1, "bob@dest.test"), (q2, "carol@dest.test"), (q3, "dave@dest.test"))] == [DELIVERED] * 3
    assert sink.connections == 2  # the receiver saw a new connection for q3...
    assert sink.messages[2].connection != first
    await asyncio.wait_for(sink.quit_seen.wait(), 10)
    assert sink.quits == [first]  # ...and the expired one was closed politely (RFC 5321 4.1.1.10)


@pytest.mark.asyncio
async def test_an_idle_session_is_closed_when_its_idle_time_ends_even_if_no_mail_follows(make, receivers):
    sink = await receivers.start("127.0.0.11", QuitSink())
    h = make(deliverer_options={"pool_idle_timeout": 0.2})
    q1 = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    assert h.states(q1)["bob@dest.test"][0] == DELIVERED
    # Nothing else is delivered: the pool's own timer ends the session (liveness bound, not a timing check).
    await asyncio.wait_for(sink.quit_seen.wait(), 10)
    assert sink.quits == [sink.messages[0].connection]
    q2 = h.submit("alice@example.org", ["carol@dest.test"])
    await h.round()
    assert h.states(q2)["carol@dest.test"][0] == DELIVERED
    assert sink.connections == 2 and sink.messages[1].connection != sink.messages[0].connection
