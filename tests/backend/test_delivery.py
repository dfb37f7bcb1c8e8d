"""Outbound delivery over real sockets: nsd serves the test zone, aiosmtpd servers on 127.x addresses receive.

The queue, runner and deliverer run on an injected clock, so retries happen by advancing it, never
by sleeping. Every test asserts what a receiver saw or what the queue recorded.
"""

from __future__ import annotations

import socket
import ssl
import warnings

import pytest

from backend.queue.model import BOUNCED, DEFERRED, DELIVERED
from tests.lab.delivery import T0, Sink, self_signed_context
from tests.lab.delivery_fixtures import (  # noqa: F401 - fixtures
    SOURCE,
    ca,
    dns_server,
    make,
    maildir_messages,
    parse_dsn,
    policy_server,
    receivers,
)


# ---------------------------------------------------------------- delivered


@pytest.mark.asyncio
async def test_delivers_to_the_mx_from_the_configured_source_address_with_starttls(make, receivers, tmp_path):
    sink = await receivers.start("127.0.0.11", Sink(), tls_context=self_signed_context(tmp_path, "mx1.dest.test"))
    h = make()
    qid = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    assert h.states(qid)["bob@dest.test"][0] == DELIVERED
    assert len(sink.messages) == 1
    got = sink.messages[0]
    assert got.peer == SOURCE  # the receiver saw the configured source address
    assert got.tls  # STARTTLS was offered, so it was used (opportunistic: certificate not checked)
    assert got.sender == "alice@example.org" and got.rcpts == ["bob@dest.test"]
    assert b"Subject: test message" in got.content
    assert h.metric("homemx_backend_delivery_attempts_total", {"result": "delivered", "tls": "unverified"}) == 1
    assert h.metric("homemx_backend_delivery_duration_seconds_count", {}) == 1


@pytest.mark.asyncio
async def test_one_connection_carries_all_recipients_and_is_reused_for_the_next_message(make, receivers):
    sink = await receivers.start("127.0.0.11", Sink())
    # One session at a time to the destination: the second message waits for, then reuses, the first's.
    h = make(per_destination_concurrency=1)
    q1 = h.submit("alice@example.org", ["bob@dest.test", "carol@dest.test"])
    q2 = h.submit("alice@example.org", ["dave@dest.test"])
    await h.round()
    assert h.states(q1) == {a: (DELIVERED, "250 2.0.0 OK accepted") for a in ("bob@dest.test", "carol@dest.test")}
    assert h.states(q2)["dave@dest.test"][0] == DELIVERED
    assert sorted(len(m.rcpts) for m in sink.messages) == [1, 2]  # one transaction per message
    assert sink.connections == 1  # and both messages over one SMTP session
    assert len({m.connection for m in sink.messages}) == 1
    q3 = h.submit("alice@example.org", ["erin@dest.test"])
    await h.round()  # a later round reuses the idle session too
    assert h.states(q3)["erin@dest.test"][0] == DELIVERED
    assert sink.connections == 1 and len(sink.messages) == 3


# ---------------------------------------------------------------- retries and bounces


@pytest.mark.asyncio
async def test_4xx_then_2xx_is_delivered_on_retry_driven_by_the_clock(make, receivers):
    sink = await receivers.start("127.0.0.11", Sink(data_replies=["451 4.7.1 Greylisted, try again later"]))
    h = make()
    qid = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    r = h.queue.get(qid).recipients[0]
    assert (r.state, r.last_reply) == (DEFERRED, "451 4.7.1 Greylisted, try again later")
    assert r.next_attempt == T0 + 300  # first step of the schedule
    await h.round()  # not due yet: nothing is attempted
    assert sink.mail_commands == 1
    h.clock.advance(299)
    await h.round()
    assert sink.mail_commands == 1
    h.clock.advance(1)
    await h.round()
    assert h.states(qid)["bob@dest.test"][0] == DELIVERED
    assert len(sink.messages) == 1 and sink.mail_commands == 2
    assert h.others(qid) == []  # no DSN for a delivered message


@pytest.mark.asyncio
async def test_5xx_for_one_of_two_recipients_delivers_one_and_bounces_one_with_an_rfc3464_dsn(make, receivers):
    sink = await receivers.start("127.0.0.11", Sink(rcpt_replies={"nobody@dest.test": "550 5.1.1 No such user here"}))
    h = make()
    qid = h.submit("alice@example.org", ["bob@dest.test", "nobody@dest.test"])
    await h.round()
    states = h.states(qid)
    assert states["bob@dest.test"][0] == DELIVERED
    assert states["nobody@dest.test"] == (BOUNCED, "550 5.1.1 No such user here")
    assert [m.rcpts for m in sink.messages] == [["bob@dest.test"]]
    # The DSN is a new message from <> to the local sender; the next round puts it in her Maildir.
    (dsn_entry,) = h.others(qid)
    assert dsn_entry.sender == "" and [r.address for r in dsn_entry.recipients] == ["alice@example.org"]
    await h.round()
    (raw,) = maildir_messages(h, "alice@example.org")
    assert raw.startswith(b"Return-Path: <>\n")  # Maildir files use LF
    msg, per_message, per_rcpt, returned = parse_dsn(raw)
    assert msg["Auto-Submitted"] == "auto-replied"
    assert per_message["Reporting-MTA"] == "dns; mail.example.org"
    assert per_message["Arrival-Date"]
    assert len(per_rcpt) == 1
    f = per_rcpt[0]
    assert f["Final-Recipient"] == "rfc822;nobody@dest.test"
    assert f["Action"] == "failed"
    assert f["Status"] == "5.1.1"
    assert f["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user here"
    assert f["Remote-MTA"] == "dns; mx1.dest.test"
    assert "Subject: test message" in returned and "Hello." not in returned
    assert h.metric("homemx_backend_bounces_total", {"kind": "failed"}) == 1


@pytest.mark.asyncio
async def test_original_recipient_is_reported_when_an_alias_was_expanded(make, receivers):
    await receivers.start("127.0.0.11", Sink(rcpt_replies={"gone@dest.test": "550 5.1.1 Gone"}))
    h = make()
    from backend.queue.model import NewMessage, NewRecipient

    qid = h.queue.enqueue(
        NewMessage(
            sender="alice@example.org",
            recipients=(NewRecipient("gone@dest.test", "team@example.org", False),),
            content=b"From: alice@example.org\r\nSubject: fwd\r\n\r\nbody\r\n",
            listener="mx",
        )
    )
    await h.round()
    await h.round()
    (raw,) = maildir_messages(h, "alice@example.org")
    _, _, (f,), _ = parse_dsn(raw)
    assert f["Original-Recipient"] == "rfc822;team@example.org"
    assert f["Final-Recipient"] == "rfc822;gone@dest.test"
    assert h.states(qid)["gone@dest.test"][0] == BOUNCED


@pytest.mark.asyncio
async def test_a_bounce_of_a_message_from_the_null_sender_makes_no_dsn(make, receivers):
    sink = await receivers.start("127.0.0.11", Sink(rcpt_replies={"nobody@dest.test": "550 5.1.1 No such user here"}))
    h = make()
    qid = h.submit("", ["nobody@dest.test"])
    await h.round()
    assert h.states(qid)["nobody@dest.test"][0] == BOUNCED
    assert sink.mail_commands == 1  # it was attempted (MAIL FROM:<>)...
    assert h.others(qid) == []  # ...and its bounce generated nothing
    assert h.metric("homemx_backend_bounces_total", {"kind": "failed"}) == 0


@pytest.mark.asyncio
async def test_a_dsn_to_a_remote_sender_goes_out_through_delivery_from_null_sender(make, receivers):
    sink = await receivers.start("127.0.0.11", Sink())
    await receivers.start("127.0.0.13", Sink(rcpt_replies={"x@two.test": "550 5.1.1 unknown"}))
    h = make()
    qid = h.submit("sender@dest.test", ["x@two.test"])  # relayed for a remote sender (e.g. forwarding)
    await h.round()
    assert h.states(qid)["x@two.test"][0] == BOUNCED
    await h.round()  # the DSN itself is delivered to dest.test's MX
    (got,) = sink.messages
    assert got.sender == "<>" and got.rcpts == ["sender@dest.test"]  # aiosmtpd's spelling of MAIL FROM:<>
    _, _, (f,), _ = parse_dsn(got.content)
    assert f["Final-Recipient"] == "rfc822;x@two.test"


@pytest.mark.asyncio
async def test_no_reply_after_the_final_dot_is_deferred(make, receivers):
    sink = await receivers.start("127.0.0.11", Sink(data_delay=3.0))
    h = make(command_timeout="1s")
    qid = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    state, reply = h.states(qid)["bob@dest.test"]
    assert state == DEFERRED
    assert reply.startswith("451 4.4.2 No reply from mx1.dest.test")
    assert sink.mail_commands == 1


@pytest.mark.asyncio
async def test_deferred_past_max_queue_age_bounces_and_delay_notice_is_sent_once(make, receivers):
    sink = await receivers.start("127.0.0.11", Sink(data_replies=["452 4.2.2 Mailbox full"] * 10))
    h = make(delay_notice_after="10m", max_queue_age="1h", retry_schedule=["15m"])
    qid = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()  # age 0: deferred, too early for a delay notice
    assert h.states(qid)["bob@dest.test"][0] == DEFERRED and h.others(qid) == []
    h.clock.advance(900)
    await h.round()  # age 15 min: deferred again, one delay notice
    assert h.states(qid)["bob@dest.test"][0] == DEFERRED
    (notice,) = h.others(qid)
    h.clock.advance(900)
    await h.round()  # age 30 min: no second notice (and the first one reaches the Maildir)
    assert [e.id for e in h.others(qid)] == [notice.id]
    (raw,) = maildir_messages(h, "alice@example.org")
    msg, _, (f,), _ = parse_dsn(raw)
    assert f["Action"] == "delayed" and f["Status"] == "4.2.2"
    assert f["Will-Retry-Until"]
    assert msg["Subject"].startswith("Delayed Mail")
    h.clock.advance(1800)
    await h.round()  # age 60 min: give up
    state, reply = h.states(qid)["bob@dest.test"]
    assert state == BOUNCED and reply.startswith("554 5.4.7 Delivery time expired")
    await h.round()
    failed = [parse_dsn(m) for m in maildir_messages(h, "alice@example.org")]
    actions = sorted(p[2][0]["Action"] for p in failed)
    assert actions == ["delayed", "failed"]
    assert sink.mail_commands == 4
    assert h.metric("homemx_backend_bounces_total", {"kind": "delayed"}) == 1


# ---------------------------------------------------------------- DNS outcomes


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "domain, state, reply_prefix",
    [
        ("nullmx.test", BOUNCED, "556 5.1.10"),  # RFC 7505 null MX
        ("nothere.test", BOUNCED, "550 5.1.2"),  # NXDOMAIN
        ("broken.test", DEFERRED, "451 4.4.3"),  # SERVFAIL
    ],
)
async def test_dns_failures(make, receivers, domain, state, reply_prefix):
    sink = await receivers.start("127.0.0.11", Sink())
    h = make()
    qid = h.submit("", [f"someone@{domain}"])
    await h.round()
    got_state, reply = h.states(qid)[f"someone@{domain}"]
    assert got_state == state
    assert reply.startswith(reply_prefix), reply
    assert sink.connections == 0


@pytest.mark.asyncio
async def test_dns_timeout_defers(make, receivers):
    # A nameserver port where nothing answers: the lookup times out (or is refused) → deferred.
    await receivers.start("127.0.0.11", Sink())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound but never read: queries go unanswered
        h = make(dns_port=silent.getsockname()[1])
        h.deliverer.resolver.lifetime = 1.0
        qid = h.submit("alice@example.org", ["bob@dest.test"])
        await h.round()
    state, reply = h.states(qid)["bob@dest.test"]
    assert state == DEFERRED and reply.startswith("451 4.4.3"), reply


@pytest.mark.asyncio
async def test_no_mx_falls_back_to_the_domains_address(make, receivers):
    sink = await receivers.start("127.0.0.14", Sink())
    h = make()
    qid = h.submit("alice@example.org", ["bob@amx.test"])
    await h.round()
    assert h.states(qid)["bob@amx.test"][0] == DELIVERED
    assert [m.rcpts for m in sink.messages] == [["bob@amx.test"]]


@pytest.mark.asyncio
async def test_lowest_preference_mx_down_goes_to_the_next_mx(make, receivers):
    # mxdown.two.test (127.0.0.12) has nothing listening on the port: connection refused.
    sink = await receivers.start("127.0.0.13", Sink())
    h = make()
    qid = h.submit("alice@example.org", ["bob@two.test"])
    await h.round()
    assert h.states(qid)["bob@two.test"][0] == DELIVERED
    assert [m.peer for m in sink.messages] == [SOURCE]


@pytest.mark.asyncio
async def test_all_mx_down_defers(make, receivers):
    await receivers.start("127.0.0.11", Sink())  # only fixes the port; two.test's hosts are both silent
    h = make()
    qid = h.submit("alice@example.org", ["bob@two.test"])
    await h.round()
    state, reply = h.states(qid)["bob@two.test"]
    assert state == DEFERRED and reply.startswith("421 4.4.1 Cannot connect to mxup.two.test"), reply


# ---------------------------------------------------------------- TLS policy


@pytest.mark.asyncio
async def test_required_tls_never_delivers_to_a_host_without_starttls(make, receivers):
    sink = await receivers.start("127.0.0.15", Sink())  # no tls_context: STARTTLS not offered
    h = make(domain_tls_policy={"notls.test": "required"})
    qid = h.submit("alice@example.org", ["bob@notls.test"])
    await h.round()
    state, reply = h.states(qid)["bob@notls.test"]
    assert state == DEFERRED and reply.startswith("421 4.7.10"), reply
    assert sink.mail_commands == 0 and sink.messages == []


@pytest.mark.asyncio
async def test_required_tls_never_delivers_over_a_bad_certificate_but_opportunistic_does(make, receivers, tmp_path):
    sink = await receivers.start("127.0.0.16", Sink(), tls_context=self_signed_context(tmp_path, "mx.badcert.test"))
    h = make(tls_policy="required")
    qid = h.submit("alice@example.org", ["bob@badcert.test"])
    await h.round()
    state, reply = h.states(qid)["bob@badcert.test"]
    assert state == DEFERRED and reply.startswith("421 4.7.5 TLS handshake"), reply
    assert sink.mail_commands == 0
    h2 = make(tls_policy="opportunistic")
    q2 = h2.submit("alice@example.org", ["bob@badcert.test"])
    await h2.round()
    assert h2.states(q2)["bob@badcert.test"][0] == DELIVERED
    assert [m.tls for m in sink.messages] == [True]


@pytest.mark.asyncio
async def test_required_tls_delivers_with_a_verified_certificate(make, receivers, ca):
    sink = await receivers.start("127.0.0.18", Sink(), tls_context=ca.server_context("mx.good.test"))
    h = make(tls_policy="required")
    qid = h.submit("alice@example.org", ["bob@good.test"])
    await h.round()
    assert h.states(qid)["bob@good.test"][0] == DELIVERED
    assert [m.tls for m in sink.messages] == [True]
    assert h.metric("homemx_backend_delivery_attempts_total", {"result": "delivered", "tls": "verified"}) == 1


# ---------------------------------------------------------------- MTA-STS


@pytest.mark.asyncio
async def test_mta_sts_enforce_never_delivers_in_cleartext(make, receivers, policy_server):
    sink = await receivers.start("127.0.0.17", Sink())  # MX named by the policy, but no STARTTLS
    h = make(mta_sts=True, mta_sts_port=policy_server.port)
    qid = h.submit("alice@example.org", ["bob@sts.test"])
    await h.round()
    state, reply = h.states(qid)["bob@sts.test"]
    assert state == DEFERRED and reply.startswith("421 4.7.10"), reply
    assert sink.mail_commands == 0
    assert policy_server.requests == 1


@pytest.mark.asyncio
async def test_mta_sts_enforce_delivers_over_verified_tls_to_a_matching_mx(make, receivers, policy_server, ca):
    sink = await receivers.start("127.0.0.19", Sink(), tls_context=ca.server_context("mx.stsgood.test"))
    h = make(mta_sts=True, mta_sts_port=policy_server.port)
    q1 = h.submit("alice@example.org", ["bob@stsgood.test"])
    q2 = h.submit("alice@example.org", ["carol@stsgood.test"])
    await h.round()
    assert h.states(q1)["bob@stsgood.test"][0] == DELIVERED
    assert h.states(q2)["carol@stsgood.test"][0] == DELIVERED
    assert [m.tls for m in sink.messages] == [True, True]
    assert policy_server.requests == 1  # the policy was cached for the second message
    assert h.metric("homemx_backend_delivery_attempts_total", {"result": "delivered", "tls": "verified"}) == 2


@pytest.mark.asyncio
async def test_mta_sts_enforce_refuses_an_mx_the_policy_does_not_name(make, receivers, policy_server, ca):
    sink = await receivers.start("127.0.0.21", Sink(), tls_context=ca.server_context("mx.stswrong.test"))
    h = make(mta_sts=True, mta_sts_port=policy_server.port)
    qid = h.submit("alice@example.org", ["bob@stswrong.test"])
    await h.round()
    state, reply = h.states(qid)["bob@stswrong.test"]
    assert state == DEFERRED and reply.startswith("451 4.7.5 No MX host"), reply
    assert sink.connections == 0


# ---------------------------------------------------------------- smarthost


@pytest.mark.asyncio
async def test_smarthost_with_auth_over_required_tls(make, receivers, ca, tmp_path):
    relay = await receivers.start(
        "127.0.0.20", Sink(), hostname="relay.test", tls_context=ca.server_context("relay.test"), auth=("homeuser", "s3cret-relay")
    )
    mx = await receivers.start("127.0.0.11", Sink())
    pw = tmp_path / "relay-password"
    pw.write_text("s3cret-relay\n")
    pw.chmod(0o600)
    h = make(
        smarthost=f"127.0.0.20:{receivers.port}",
        smarthost_hostname="relay.test",
        smarthost_username="homeuser",
        smarthost_password_file=str(pw),
    )
    qid = h.submit("alice@example.org", ["bob@dest.test", "x@nowhere.invalid"])
    await h.round()
    assert set(s for s, _ in h.states(qid).values()) == {DELIVERED}
    (got,) = relay.messages
    assert got.tls and got.auth == "homeuser" and got.peer == SOURCE
    assert sorted(got.rcpts) == ["bob@dest.test", "x@nowhere.invalid"]  # no MX lookup in smarthost mode
    assert mx.messages == []


@pytest.mark.asyncio
async def test_smarthost_without_starttls_gets_no_credentials(make, receivers, tmp_path):
    relay = await receivers.start("127.0.0.20", Sink(), hostname="relay.test")
    pw = tmp_path / "relay-password"
    pw.write_text("s3cret-relay\n")
    h = make(
        smarthost=f"127.0.0.20:{receivers.port}",
        smarthost_hostname="relay.test",
        smarthost_username="homeuser",
        smarthost_password_file=str(pw),
    )
    qid = h.submit("alice@example.org", ["bob@dest.test"])
    await h.round()
    state, reply = h.states(qid)["bob@dest.test"]
    assert state == DEFERRED and reply.startswith("421 4.7.10"), reply
    assert relay.mail_commands == 0


@pytest.mark.asyncio
async def test_smarthost_for_selected_domains_only(make, receivers, ca, tmp_path):
    relay = await receivers.start("127.0.0.20", Sink(), hostname="relay.test", tls_context=ca.server_context("relay.test"))
    mx = await receivers.start("127.0.0.11", Sink())
    h = make(smarthost=f"127.0.0.20:{receivers.port}", smarthost_hostname="relay.test", smarthost_domains=["amx.test"])
    qid = h.submit("alice@example.org", ["bob@dest.test", "y@amx.test"])
    await h.round()
    assert set(s for s, _ in h.states(qid).values()) == {DELIVERED}
    assert [m.rcpts for m in relay.messages] == [["y@amx.test"]]
    assert [m.rcpts for m in mx.messages] == [["bob@dest.test"]]


@pytest.mark.asyncio
async def test_opportunistic_tls_falls_back_to_cleartext_when_the_handshake_fails(make, receivers, ca):
    # The server offers STARTTLS but cannot complete a handshake (it only speaks TLS 1.1, which
    # our client refuses): opportunistic delivery reconnects in cleartext, required never does.
    broken = ca.server_context("mx.good.test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        broken.minimum_version = broken.maximum_version = ssl.TLSVersion.TLSv1_1
    sink = await receivers.start("127.0.0.18", Sink(), tls_context=broken)
    h = make(tls_policy="required")
    qid = h.submit("alice@example.org", ["bob@good.test"])
    await h.round()
    state, reply = h.states(qid)["bob@good.test"]
    assert state == DEFERRED and reply.startswith("421 4.7.5 TLS handshake"), reply
    assert sink.mail_commands == 0
    h2 = make()
    q2 = h2.submit("alice@example.org", ["bob@good.test"])
    await h2.round()
    assert h2.states(q2)["bob@good.test"][0] == DELIVERED
    assert [m.tls for m in sink.messages] == [False]
    assert h2.metric("homemx_backend_delivery_attempts_total", {"result": "delivered", "tls": "none"}) == 1
