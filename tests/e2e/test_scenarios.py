"""End-to-end scenarios over the namespace lab: inbound, outbound with DKIM/SPF, phones, outages, crashes, remote trouble, metrics.

Every scenario drives real clients (swaks, imaplib, a real Postfix) against daemons started through
their CLIs (tests/lab/topology.py) and asserts what a user would see: a message in a Maildir, a
reply code, a header the receiver wrote, a signature an independent verifier accepts, a counter.
Each scenario uses its own subjects and mailboxes, so they do not depend on their order.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backend.queue.model import FINAL_STATES, STATES
from tests.lab.topology import HOME_DOMAIN, HOSTNAME, REMOTE_DOMAIN, USERS, MailLab, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ALICE = f"alice@{HOME_DOMAIN}"
ALICE_PW = USERS[ALICE]
DELIVERY_TIMEOUT = 45.0


def tag(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


def with_subject(messages: list[bytes], subject: str) -> list[bytes]:
    return [m for m in messages if f"Subject: {subject}".encode() in m]


def headers_of(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (Prometheus text parsed)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def send_lan(lab: MailLab, to: str, subject: str, sender: str = ALICE) -> None:
    """A homelab app on the LAN submits to the backend's lan listener (trusted network, no AUTH)."""
    r = lab.swaks("--server", f"{lab.home_addr}:587", "--from", sender, "--to", to, "--h-Subject", subject,
                  "--h-From", sender, ns=lab.home)
    assert r.returncode == 0 and "250 2.0.0" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- 1 inbound

IMAP_FETCH = r"""
import imaplib, json, ssl, sys
host, user, pw, subject = sys.argv[1:5]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
with imaplib.IMAP4_SSL(host, 993, ssl_context=ctx, timeout=20) as m:
    m.login(user, pw)
    m.select("INBOX")
    typ, data = m.search(None, "SUBJECT", '"%s"' % subject)
    ids = data[0].split()
    bodies = [m.fetch(i, "(RFC822)")[1][0][1].decode(errors="replace") for i in ids]
    print(json.dumps(bodies))
"""


def test_1_inbound_via_gateway_25_then_imaps_via_993(mail_lab: MailLab):
    lab = mail_lab
    subject = tag("s1")
    r = lab.swaks("--server", f"{lab.gateway_addr}:25", "--from", f"someone@{REMOTE_DOMAIN}", "--to", ALICE,
                  "--h-Subject", subject)
    assert r.returncode == 0 and "250 2.0.0" in r.stdout, r.stdout + r.stderr
    msgs = wait_until(lambda: with_subject(lab.maildir_messages(ALICE), subject), DELIVERY_TIMEOUT,
                      "the message in alice's Maildir")
    assert len(msgs) == 1
    received = headers_of(msgs[0]).get_all("Received")[0]
    # The backend saw the sender's real address through the gateway's PROXY v2 header, not the tunnel's.
    assert f"[{lab.sender_addr}]" in received, received
    assert lab.gateway_tunnel_addr not in received

    out = lab.python(lab.internet, IMAP_FETCH, lab.gateway_addr, ALICE, ALICE_PW, subject)
    assert out.returncode == 0, out.stdout + out.stderr
    bodies = json.loads(out.stdout)
    assert len(bodies) == 1 and subject in bodies[0]
    # Dovecot logged the real client address carried by the gateway's PROXY header.
    assert f"rip={lab.sender_addr}" in lab.dovecot.log() or f"rip={lab.internet_addr}" in lab.dovecot.log()


# ---------------------------------------------------------------- 2 outbound from the LAN

# The SPF oracle is pyspf (an independent implementation), not backend.dns.spf: our own engine
# grading our own records would agree with itself. It resolves through the internet namespace's
# resolv.conf, i.e. the lab's nsd serving the records `homemx-backend dns records` printed.
SPF_CHECK = r"""
import sys
import spf
print(spf.check2(i=sys.argv[1], s=sys.argv[2], h=sys.argv[3])[0])
"""


def only_signature(raw: bytes, keep: int) -> bytes:
    """The message with only its ``keep``-th DKIM-Signature header (so each is verified on its own)."""
    head, sep, body = raw.partition(b"\n\n")
    fields: list[bytes] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\n" + line
        else:
            fields.append(line)
    out, n = [], 0
    for f in fields:
        if f.lower().startswith(b"dkim-signature:"):
            if n != keep:
                n += 1
                continue
            n += 1
        out.append(f)
    return b"\n".join(out) + sep + body


def test_2_outbound_from_lan_app_dkim_spf(mail_lab: MailLab):
    lab = mail_lab
    subject = tag("s2")
    send_lan(lab, f"bob@{REMOTE_DOMAIN}", subject)
    msgs = wait_until(lambda: with_subject(lab.postfix.messages("bob"), subject), DELIVERY_TIMEOUT,
                      "the message at the remote Postfix")
    assert len(msgs) == 1
    raw = msgs[0]
    msg = headers_of(raw)
    top = msg.get_all("Received")[0]
    # Postfix saw the connection come from the gateway's public address (SNAT of the egress rules),
    # and its reverse lookup (PTR from the lab DNS) named our host.
    assert f"[{lab.gateway_addr}]" in top, top
    assert "mail.example.org" in top, top

    sigs = msg.get_all("DKIM-Signature")
    assert len(sigs) == 2, sigs
    algs = sorted(re.search(r"a=([\w-]+)", s).group(1) for s in sigs)
    assert algs == ["ed25519-sha256", "rsa-sha256"]
    for i in range(2):
        v = lab.internet.run(["opendkim-testmsg"], check=False, input=only_signature(raw, i).decode())
        assert v.returncode == 0, f"signature {i} failed: {v.stdout}{v.stderr}"

    ip = re.search(r"\[(\d+\.\d+\.\d+\.\d+)\]", top).group(1)
    spf = lab.python(lab.internet, SPF_CHECK, ip, ALICE, HOSTNAME)
    assert spf.stdout.strip() == "pass", spf.stdout + spf.stderr
    # The same sender from any other address fails (the record ends in -all): pyspf really
    # evaluated the published record rather than passing for want of one.
    other = lab.python(lab.internet, SPF_CHECK, lab.sender_addr, ALICE, HOSTNAME)
    assert other.stdout.strip() == "fail", other.stdout + other.stderr


# ---------------------------------------------------------------- 3 phones

PHONE_AUTH = ["--auth", "PLAIN", "--auth-user", ALICE, "--from", ALICE, "--to", f"phone@{REMOTE_DOMAIN}",
              "--h-From", ALICE]


def test_3_phone_submission_587_auth_and_relay_refused(mail_lab: MailLab):
    lab = mail_lab
    s587 = tag("s3-587")
    r = lab.swaks("--server", f"{lab.gateway_addr}:587", "--tls", *PHONE_AUTH, "--auth-password", ALICE_PW,
                  "--h-Subject", s587)
    assert r.returncode == 0 and "235 " in r.stdout and "250 2.0.0" in r.stdout, r.stdout + r.stderr
    wait_until(lambda: with_subject(lab.postfix.messages("phone"), s587), DELIVERY_TIMEOUT, f"{s587} at the remote")

    bad = lab.swaks("--server", f"{lab.gateway_addr}:587", "--tls", *PHONE_AUTH, "--auth-password", "wrong-password",
                    "--h-Subject", tag("s3-bad"))
    assert bad.returncode != 0 and "535" in bad.stdout, bad.stdout

    relay_subject = tag("s3-relay")
    relay = lab.swaks("--server", f"{lab.gateway_addr}:25", "--from", f"spammer@{REMOTE_DOMAIN}",
                      "--to", f"relaytest@{REMOTE_DOMAIN}", "--h-Subject", relay_subject)
    assert relay.returncode != 0, relay.stdout
    rcpt_reply = relay.stdout.split("RCPT TO:<relaytest@")[1].splitlines()[1]
    assert re.match(r"<\*\*\s+5\d\d ", rcpt_reply), relay.stdout
    queue = lab.backend_cli("queue", "list", "--all")
    assert queue.returncode == 0, queue.stderr
    assert f"relaytest@{REMOTE_DOMAIN}" not in queue.stdout
    assert not with_subject(lab.postfix.messages("relaytest"), relay_subject)


def test_3_phone_submissions_465_implicit_tls(mail_lab: MailLab):
    lab = mail_lab
    s465 = tag("s3-465")
    r = lab.swaks("--server", f"{lab.gateway_addr}:465", "--tlsc", *PHONE_AUTH, "--auth-password", ALICE_PW,
                  "--h-Subject", s465)
    assert r.returncode == 0 and "235 " in r.stdout, r.stdout + r.stderr
    wait_until(lambda: with_subject(lab.postfix.messages("phone"), s465), DELIVERY_TIMEOUT, f"{s465} at the remote")


# ---------------------------------------------------------------- 4 home outage

def test_4_tunnel_cut_gives_421_and_real_mta_delivers_after(mail_lab: MailLab):
    lab = mail_lab
    before = lab.scrape("gateway")
    subject = tag("s4")
    lab.cut_tunnel()
    try:
        t0 = time.monotonic()
        r = lab.swaks("--server", f"{lab.gateway_addr}:25", "--from", f"x@{REMOTE_DOMAIN}", "--to", ALICE,
                      "--h-Subject", tag("s4-direct"), timeout=60)
        took = time.monotonic() - t0
        print(f"421 from the gateway after {took:.2f}s (connect_timeout {lab.gateway_connect_timeout})")
        assert "421 4.3.2" in r.stdout, r.stdout + r.stderr
        # A real sending MTA: the internet's Postfix queues the message and meets the same 421.
        q = lab.swaks("--server", f"{lab.internet_addr}:25", "--from", f"bob@{REMOTE_DOMAIN}", "--to", ALICE,
                      "--h-Subject", subject)
        assert q.returncode == 0, q.stdout + q.stderr
        wait_until(lambda: re.search(r"to=<alice@example\.org>.*status=deferred.*421", lab.postfix.log()),
                   DELIVERY_TIMEOUT, "Postfix deferring on the gateway's 421")
        assert not with_subject(lab.maildir_messages(ALICE), subject)
    finally:
        lab.restore_tunnel()
    lab.postfix.flush()
    msgs = wait_until(lambda: with_subject(lab.maildir_messages(ALICE), subject), DELIVERY_TIMEOUT,
                      "the retried message in alice's Maildir")
    wait_until(lambda: "Mail queue is empty" in lab.postfix.queue(), DELIVERY_TIMEOUT, "Postfix's queue to drain")
    assert len(with_subject(lab.maildir_messages(ALICE), subject)) == 1 == len(msgs)
    after = lab.scrape("gateway")
    assert (metric(after, "homemx_gateway_connections_total", listener="mx", outcome="upstream_unavailable")
            > metric(before, "homemx_gateway_connections_total", listener="mx", outcome="upstream_unavailable"))


# ---------------------------------------------------------------- 5 crash

def pending(lab: MailLab) -> float:
    """Recipients not yet final (queued, deferred or held), from the backend's queue gauge."""
    by_state = {s.labels["state"]: s.value for f in text_string_to_metric_families(lab.scrape("backend"))
                for s in f.samples if s.name == "homemx_backend_queue_recipients"}
    # Every state the queue knows is exported (a missing or renamed series would read as 0 pending).
    assert set(by_state) == set(STATES), by_state
    return sum(n for state, n in by_state.items() if state not in FINAL_STATES)


def test_5_backend_sigkill_with_queue_then_mx_back_exactly_once(mail_lab: MailLab):
    lab = mail_lab
    base = tag("s5")
    subjects = [f"{base}-{i}" for i in range(5)]
    lab.postfix.stop()
    try:
        before = lab.scrape("backend")
        for s in subjects:
            send_lan(lab, f"crash@{REMOTE_DOMAIN}", s)  # each got its 250: acknowledged
        wait_until(lambda: metric(lab.scrape("backend"), "homemx_backend_delivery_attempts_total", result="deferred")
                   >= metric(before, "homemx_backend_delivery_attempts_total", result="deferred") + 1,
                   DELIVERY_TIMEOUT, "a failed attempt against the downed MX")
        lab.kill_backend()
        lab.start_backend()
    finally:
        lab.postfix.start()
    for s in subjects:
        wait_until(lambda: with_subject(lab.postfix.messages("crash"), s), DELIVERY_TIMEOUT, f"{s} delivered")
    wait_until(lambda: pending(lab) == 0, DELIVERY_TIMEOUT, "the backend queue to have nothing pending")
    got = lab.postfix.messages("crash")
    for s in subjects:
        assert len(with_subject(got, s)) == 1, f"{s} delivered {len(with_subject(got, s))} times"


# ---------------------------------------------------------------- 6 remote trouble

def test_6_remote_4xx_then_delivered_and_5xx_bounces(mail_lab: MailLab):
    lab = mail_lab
    later = tag("s6-later")
    lab.postfix.set_recipient_access({f"later@{REMOTE_DOMAIN}": "450 4.2.0 mailbox busy, try later"})
    try:
        send_lan(lab, f"later@{REMOTE_DOMAIN}", later)
        wait_until(lambda: len(re.findall(r"450 4\.2\.0 <later@remote\.test>", lab.postfix.log())) >= 1,
                   DELIVERY_TIMEOUT, "the remote's 450 to the backend")
        assert not with_subject(lab.postfix.messages("later"), later)
    finally:
        lab.postfix.set_recipient_access({})
    wait_until(lambda: with_subject(lab.postfix.messages("later"), later), DELIVERY_TIMEOUT, "delivery after retry")

    bounced = tag("s6-bounce")
    send_lan(lab, f"nosuchuser@{REMOTE_DOMAIN}", bounced)

    def bounce():
        for raw in lab.maildir_messages(ALICE):
            if bounced.encode() in raw and b"delivery-status" in raw:
                return raw
        return None

    raw = wait_until(bounce, DELIVERY_TIMEOUT, "an RFC 3464 bounce in alice's Maildir")
    dsn = email.message_from_bytes(raw, policy=email.policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert re.search(r"Final-Recipient: rfc822; ?nosuchuser@remote\.test", text, re.I), text
    assert re.search(r"Action: failed", text), text
    assert re.search(r"Status: 5\.\d+\.\d+", text), text


# ---------------------------------------------------------------- 7 metrics

def handshake_age_matches_wg(lab: MailLab) -> bool:
    """True when the gateway's handshake-age gauge for its tunnel interface is what `wg show
    latest-handshakes` implies at scrape time (within 3 s: integer timestamps plus the scrape's
    own duration). False when a handshake happened between the readings (the caller retries)."""
    ifname = lab.tunnel.gw_if

    def latest() -> int:
        out = lab.gateway.run(["wg", "show", ifname, "latest-handshakes"], env=lab.tunnel.env).stdout.split()
        assert len(out) == 2 and int(out[1]) > 0, out  # one peer, with a handshake
        return int(out[1])

    before = latest()
    scraped_at = time.time()
    text = lab.scrape("gateway")
    if latest() != before:
        return False
    ages = [s for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "homemx_gateway_tunnel_handshake_age_seconds"]
    assert [s.labels for s in ages] == [{"interface": ifname}], ages
    expected = scraped_at - before
    assert abs(ages[0].value - expected) <= 3, (ages[0].value, expected)
    return True


def test_7_metrics_endpoints_scrape_and_counters_move(mail_lab: MailLab):
    lab = mail_lab
    gw0, be0 = lab.scrape("gateway"), lab.scrape("backend")
    for text in (gw0, be0):
        assert list(text_string_to_metric_families(text))  # valid Prometheus text
    # The handshake age agrees with what `wg` itself reports for the gateway's interface.
    wait_until(lambda: handshake_age_matches_wg(lab), 30, "the handshake age metric to match `wg show`")

    inbound, outbound = tag("s7-in"), tag("s7-out")
    r = lab.swaks("--server", f"{lab.gateway_addr}:25", "--from", f"m@{REMOTE_DOMAIN}", "--to", ALICE,
                  "--h-Subject", inbound)
    assert r.returncode == 0, r.stdout
    send_lan(lab, f"bob@{REMOTE_DOMAIN}", outbound)
    wait_until(lambda: with_subject(lab.maildir_messages(ALICE), inbound), DELIVERY_TIMEOUT, "inbound delivered")
    wait_until(lambda: with_subject(lab.postfix.messages("bob"), outbound), DELIVERY_TIMEOUT, "outbound delivered")

    def deltas():
        gw, be = lab.scrape("gateway"), lab.scrape("backend")
        d = lambda a, b, n, **l: metric(b, n, **l) - metric(a, n, **l)  # noqa: E731
        return gw, be, {
            "gateway mx relayed": d(gw0, gw, "homemx_gateway_connections_total", listener="mx", outcome="relayed"),
            "gateway mx bytes in": d(gw0, gw, "homemx_gateway_bytes_total", listener="mx", direction="client_to_upstream"),
            "backend mx received": d(be0, be, "homemx_backend_messages_received_total", listener="mx"),
            "backend lan received": d(be0, be, "homemx_backend_messages_received_total", listener="lan"),
            "maildir deliveries": d(be0, be, "homemx_backend_maildir_deliveries_total"),
            "remote delivery attempts": d(be0, be, "homemx_backend_delivery_attempts_total"),
            "dkim rsa": d(be0, be, "homemx_backend_dkim_signatures_total", algorithm="rsa-sha256"),
            "dkim ed25519": d(be0, be, "homemx_backend_dkim_signatures_total", algorithm="ed25519-sha256"),
        }

    last = {}

    def moved():
        gw, be, ds = deltas()
        last.update(ds)
        return all(v >= 1 for v in ds.values()) and (gw, be)

    try:
        gw, be = wait_until(moved, 15, "the counters to move")
    except AssertionError:
        raise AssertionError(f"counters that did not move: {[k for k, v in last.items() if v < 1]}\n"
                             f"{lab.scrape('gateway')}\n{lab.scrape('backend')}")
    assert metric(gw, "homemx_gateway_upstream_up", listener="mx") == 1
