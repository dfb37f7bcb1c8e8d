"""Outbound SMTP sessions over real sockets: HELO fallback, the connection pool's idle expiry, and a
smarthost on implicit TLS (port 465 style) with AUTH.

Same lab as test_delivery.py (nsd on loopback, aiosmtpd receivers on 127.x addresses, a queue and
runner on an injected clock); every test asserts what a receiver saw or what the queue recorded.
"""

from __future__ import annotations

import asyncio
import base64
import time
import warnings
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from backend.config import ConfigError
from backend.queue.model import DEFERRED, DELIVERED
from tests.lab.delivery_fixtures import SOURCE, ca, dns_server, make, policy_server, receivers  # noqa: F401 - fixtures
from tests.lab.delivery import Clock, Sink, backend_config, self_signed_context


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


@dataclass
class VerbSink(Sink):
    """A Sink that records the transaction commands it was sent, in order."""

    verbs: list[str] = field(default_factory=list)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.verbs.append("MAIL")
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    async def handle_DATA(self, server, session, envelope):
        self.verbs.append("DATA")
        return await super().handle_DATA(server, session, envelope)

    async def handle_RSET(self, server, session, envelope):
        self.verbs.append("RSET")
        return "250 2.0.0 OK"

    async def handle_NOOP(self, server, session, envelope, arg):
        self.verbs.append("NOOP")
        return "250 2.0.0 OK"


@pytest.mark.asyncio
async def test_a_pooled_session_carries_the_next_message_without_rset_after_a_250_to_data(make, receivers):
    # RFC 5321 4.1.1.4: the reply to the data ends the transaction; an RSET after it is a round
    # trip for nothing. A refused DATA still gets its RSET; a pooled session its NOOP before reuse.
    sink = await receivers.start("127.0.0.11", VerbSink(data_replies=["250 ok", "451 4.3.0 try later"]))
    h = make()
    q1 = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    q2 = h.submit("alice@example.org", ["carol@dest.test"])
    await h.round()
    assert h.states(q1)["bob@dest.test"][0] == DELIVERED and h.states(q2)["carol@dest.test"][0] == DEFERRED
    assert sink.connections == 1
    assert sink.verbs == ["MAIL", "DATA", "NOOP", "MAIL", "DATA", "RSET"]


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


# ---------------------------------------------------------------- smarthost with implicit TLS


RELAY_USER, RELAY_PASSWORD = "homeuser", "s3cret-relay"
# Every form the password can take on the wire: as typed (AUTH LOGIN decoded), AUTH PLAIN, AUTH LOGIN.
PASSWORD_FORMS = (
    RELAY_PASSWORD.encode(),
    base64.b64encode(f"\0{RELAY_USER}\0{RELAY_PASSWORD}".encode()),
    base64.b64encode(RELAY_PASSWORD.encode()),
)


@dataclass
class AuthSink(Sink):
    """A Sink that records every AUTH attempt: (user, whether the connection was TLS)."""

    auth_attempts: list[tuple[str, bool]] = field(default_factory=list)


class ImplicitTLSServer(SMTP):
    """An SMTP server on a TLS listener (RFC 8314 3.3): the connection is TLS from the first byte.

    aiosmtpd only knows TLS begun by STARTTLS, so the session's TLS state is taken from the transport.
    """

    def connection_made(self, transport):
        super().connection_made(transport)
        self.session.ssl = transport.get_extra_info("ssl_object")


def _authenticator(sink: AuthSink):
    def check(server, session, envelope, mechanism, auth_data):
        user = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?"
        sink.auth_attempts.append((user, session.ssl is not None))
        ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
            RELAY_USER.encode(), RELAY_PASSWORD.encode(),
        )
        return AuthResult(success=ok, auth_data=user if ok else None)

    return check


class RecordingProxy:
    """A TCP relay on ``address`` to ``upstream`` that keeps every byte the client sent: what a
    wire tap between homemx and its smarthost would see."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.from_client = bytearray()
        self.peers: list[str] = []
        self.server = None
        self.port = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, address: str) -> "RecordingProxy":
        self.server = await asyncio.start_server(self._handle, address, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, client_reader, client_writer):
        self.peers.append(client_writer.get_extra_info("peername")[0])
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pump(reader, writer, record: bool):
            try:
                while data := await reader.read(65536):
                    if record:
                        self.from_client += data
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        await asyncio.gather(pump(client_reader, up_writer, True), pump(up_reader, client_writer, False))

    async def close(self) -> None:
        self.server.close()


@pytest_asyncio.fixture
async def implicit_relay(receivers):
    """Start an implicit-TLS relay (AUTH required) behind a recording proxy: (sink, proxy)."""
    proxies = []

    async def start(tls_context):
        sink = AuthSink()

        def factory():
            sink.connections += 1
            # auth_require_tls would look for STARTTLS only; this listener has no cleartext at all.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
                return ImplicitTLSServer(
                    sink, hostname="relay.test", auth_required=True, auth_require_tls=False, authenticator=_authenticator(sink)
                )

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.23", 0, ssl=tls_context)
        receivers.servers.append(server)
        proxy = await RecordingProxy(("127.0.0.23", server.sockets[0].getsockname()[1])).start("127.0.0.20")
        proxies.append(proxy)
        return sink, proxy

    yield start
    for p in proxies:
        await p.close()


def relay_harness(make, proxy: RecordingProxy, tmp_path):
    """A harness that relays everything through the proxy to the implicit-TLS smarthost."""
    pw = tmp_path / "relay-password"
    pw.write_text(RELAY_PASSWORD + "\n")
    pw.chmod(0o600)
    return make(
        remote_port=proxy.port,  # unused: in smarthost mode no MX is contacted
        smarthost=f"127.0.0.20:{proxy.port}",
        smarthost_tls="implicit",
        smarthost_hostname="relay.test",
        smarthost_username=RELAY_USER,
        smarthost_password_file=str(pw),
    )


@pytest.mark.asyncio
async def test_smarthost_with_implicit_tls_gets_credentials_only_inside_tls(make, ca, implicit_relay, tmp_path):
    relay, proxy = await implicit_relay(ca.server_context("relay.test"))
    h = relay_harness(make, proxy, tmp_path)
    qid = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    assert h.states(qid)["bob@dest.test"] == (DELIVERED, "250 2.0.0 OK accepted")
    (got,) = relay.messages
    assert got.auth == RELAY_USER and got.tls
    assert relay.auth_attempts == [(RELAY_USER, True)]
    assert proxy.peers == [SOURCE]
    # On the wire: a TLS handshake record from the very first byte (no cleartext EHLO/STARTTLS
    # before it, RFC 8314 3.3) and the password in none of its encodings.
    assert proxy.from_client[:1] == b"\x16"
    assert not any(form in proxy.from_client for form in PASSWORD_FORMS)
    assert h.metric("homemx_backend_delivery_attempts_total", {"result": "delivered", "tls": "verified"}) == 1


@pytest.mark.asyncio
async def test_smarthost_with_implicit_tls_and_a_certificate_that_does_not_verify_defers_without_credentials(
    make, implicit_relay, tmp_path
):
    relay, proxy = await implicit_relay(self_signed_context(tmp_path, "relay.test"))  # not signed by the trusted CA
    h = relay_harness(make, proxy, tmp_path)
    qid = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    state, reply = h.states(qid)["bob@dest.test"]
    assert state == DEFERRED and reply.startswith("421 4.7.5 TLS handshake with relay.test"), reply
    assert "certificate" in reply
    assert relay.auth_attempts == [] and relay.mail_commands == 0 and relay.messages == []
    assert proxy.from_client[:1] == b"\x16"  # it tried TLS...
    assert not any(form in proxy.from_client for form in PASSWORD_FORMS)  # ...and sent no password


def _delivery_config(tmp_path, **delivery):
    return backend_config(tmp_path, delivery=delivery).delivery


def test_smarthost_port_465_means_implicit_tls_unless_configured_otherwise(tmp_path):
    assert _delivery_config(tmp_path, smarthost="192.0.2.1:465").smarthost_tls == "implicit"
    assert _delivery_config(tmp_path, smarthost="192.0.2.1:587").smarthost_tls == "starttls"
    assert _delivery_config(tmp_path, smarthost="192.0.2.1").smarthost_tls == "starttls"
    assert _delivery_config(tmp_path, smarthost="192.0.2.1:2465", smarthost_tls="implicit").smarthost_tls == "implicit"
    with pytest.raises(ConfigError, match="smarthost_tls"):
        _delivery_config(tmp_path, smarthost="192.0.2.1:465", smarthost_tls="ssl")


# ---------------------------------------------------------------- DNS answers per destination


class CountingResolver:
    """The real resolver, counting what it is asked."""

    def __init__(self, real):
        self.real = real
        self.asked: list[tuple[str, str]] = []

    async def resolve(self, name, rtype, **kw):
        self.asked.append((name, rtype))
        return await self.real.resolve(name, rtype, **kw)


@pytest.mark.asyncio
async def test_a_burst_to_one_domain_asks_dns_once_within_the_hold_and_failures_are_asked_again(tmp_path, dns_server):
    from backend.deliver.mx import TemporaryFailure
    from backend.deliver.tlspolicy import Destinations
    from backend.dns.resolver import make_resolver

    cfg = backend_config(tmp_path, delivery={"nameservers": [dns_server.address], "dns_port": dns_server.port,
                                             "source_address": "127.0.0.1", "mta_sts": False})
    resolver = CountingResolver(make_resolver(cfg.delivery.nameservers, cfg.delivery.dns_port, timeout=3.0))
    dest = Destinations(cfg.delivery, resolver, None)
    clock = Clock(time.time())  # the answers' expiry times are wall-clock times
    dest.hosts.now = clock
    first = await dest.targets("dest.test")
    assert [(t.host_name, t.address) for t in first] == [("mx1.dest.test", "127.0.0.11")]
    assert resolver.asked == [("dest.test", "MX"), ("mx1.dest.test", "A")]  # an IPv4 source: no AAAA
    clock.advance(4.9)
    assert [(t.host_name, t.address) for t in await dest.targets("dest.test")] == [("mx1.dest.test", "127.0.0.11")]
    assert len(resolver.asked) == 2  # the second message of the burst asked nothing
    clock.advance(0.2)  # past the hold (5 s; the zone's TTL is longer): asked again
    await dest.targets("dest.test")
    assert len(resolver.asked) == 4
    for _ in range(2):  # SERVFAIL: never kept
        with pytest.raises(TemporaryFailure):
            await dest.targets("broken.test")
    assert resolver.asked[4:] == [("broken.test", "MX"), ("broken.test", "MX")]
