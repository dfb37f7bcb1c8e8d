"""Receiving over real sockets: the mx listener behind PROXY v2, submission with AUTH, lan, limits,
relay disguises and SMTP smuggling. The backend runs in-process on loopback ports chosen by the OS."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import socket
import ssl
import subprocess

import aiosmtplib
import pytest
import pytest_asyncio

from backend.config import load_config
from backend.queue.store import Queue
from backend.run import Backend
from gateway.proxyv2 import encode_local_v2, encode_proxy_v2
from tests.backend.helpers import (
    ALICE,
    ALICE_PW,
    BOB,
    HOSTNAME,
    RawSMTP,
    client_tls,
    listener_block,
    maildir_files,
    running_backend,
    wait_for,
    write_config,
)
from tests.conftest import require_tool

REAL_CLIENT = ("203.0.113.7", 40123)
REAL_CLIENT6 = ("2001:db8::77", 40124)

MSG = (
    "From: Carol <carol@remote.example>\r\nTo: alice@example.org\r\nSubject: hello\r\n"
    "Message-ID: <1@remote.example>\r\n\r\nHello Alice.\r\n"
)


def all_listeners(**lan) -> str:
    return (
        listener_block("mx", "mx", proxy_protocol=True, trusted_proxies=["127.0.0.1/32", "::1/128"])
        + listener_block("mxplain", "mx")
        + listener_block("submission", "submission", auth_failure_delay=0, auth_max_failures=3)
        + listener_block("submissions", "submissions", auth_failure_delay=0)
        + listener_block("lan", "lan", trusted_networks=lan.get("trusted", ["127.0.0.0/8"]), auth_failure_delay=0)
        + listener_block(
            "small", "mx", max_message_size=2048, max_recipients=2, max_received_headers=5
        )
    )


@pytest_asyncio.fixture
async def backend(tmp_path):
    cfg_path = write_config(tmp_path, all_listeners(), aliases={"postmaster": [ALICE], "team": [ALICE, BOB]})
    async with running_backend(cfg_path) as b:
        b.tmp = tmp_path  # type: ignore[attr-defined]
        yield b


def queue_rows(b: Backend):
    return Queue(b.config.queue_db, group_commit=False).list(None)


# ---------------------------------------------------------------- mx behind PROXY v2


@pytest.mark.asyncio
@pytest.mark.parametrize("client", [REAL_CLIENT, REAL_CLIENT6], ids=["ipv4", "ipv6"])
async def test_mx_proxy_v2_real_address_in_received(backend, client):
    port = backend.bound_port("mx")
    header = encode_proxy_v2(client, ("198.51.100.1", 25))
    c = await RawSMTP.connect(port, prefix=header)
    assert (await c.reply()).startswith("220 ")
    assert "250" in await c.cmd("EHLO sender.remote.example")
    assert (await c.cmd("MAIL FROM:<carol@remote.example>")).startswith("250")
    assert (await c.cmd("RCPT TO:<alice@example.org>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    reply = await c.cmd(MSG.encode() + b".\r\n")
    assert reply.startswith("250 2.0.0 OK: queued as ")
    await c.cmd("QUIT")
    files = await wait_for(lambda: maildir_files(backend.tmp, ALICE))
    text = files[0].read_text()
    assert f"[{'IPv6:' if ':' in client[0] else ''}{client[0]}]" in text.split("\n\n")[0]
    assert "127.0.0.1" not in text.split("\n\n")[0]
    assert text.startswith("Return-Path: <carol@remote.example>\nDelivered-To: alice@example.org\n")
    assert "Hello Alice.\n" in text


@pytest.mark.asyncio
async def test_mx_real_address_survives_starttls(backend):
    port = backend.bound_port("mx")
    c = await RawSMTP.connect(port, prefix=encode_proxy_v2(REAL_CLIENT, ("198.51.100.1", 25)))
    await c.reply()
    ehlo = await c.cmd("EHLO sender.remote.example")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo  # no AUTH on the MX
    assert (await c.cmd("STARTTLS")).startswith("220")
    await c.starttls()
    await c.cmd("EHLO sender.remote.example")
    assert (await c.cmd("MAIL FROM:<carol@remote.example>")).startswith("250")
    assert (await c.cmd("RCPT TO:<postmaster@example.org>")).startswith("250")  # alias → alice
    await c.cmd("DATA")
    assert (await c.cmd(MSG.encode() + b".\r\n")).startswith("250")
    files = await wait_for(lambda: maildir_files(backend.tmp, ALICE))
    head = files[0].read_text().split("\n\n")[0]
    assert "[203.0.113.7]" in head and "with ESMTPS" in head


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "prefix",
    [
        b"",  # no header at all: the client waits for a banner that never comes
        b"EHLO x\r\n",  # plain SMTP where a header is required
        b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 25\r\n",  # v1
        encode_local_v2(),  # LOCAL
    ],
    ids=["none", "smtp", "v1", "local"],
)
async def test_mx_without_valid_header_closed_before_banner(backend, prefix):
    c = await RawSMTP.connect(backend.bound_port("mx"), prefix=prefix)
    if not prefix:
        # aiosmtpd waits up to its PROXY timeout; nothing (no banner) may arrive meanwhile.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(c.reader.read(1), 1.0)
        c.close()
        return
    assert await c.closed_without_banner()


@pytest.mark.asyncio
async def test_mx_untrusted_peer_closed_before_banner(tmp_path):
    cfg_path = write_config(tmp_path, listener_block("mx", "mx", proxy_protocol=True, trusted_proxies=["127.0.0.2/32"]))
    async with running_backend(cfg_path) as b:
        c = await RawSMTP.connect(b.bound_port("mx"), prefix=encode_proxy_v2(REAL_CLIENT, ("198.51.100.1", 25)))
        assert await c.closed_without_banner()
        # ... while the trusted address gets through.
        c = await RawSMTP.connect(
            b.bound_port("mx"), prefix=encode_proxy_v2(REAL_CLIENT, ("198.51.100.1", 25)), local_addr=("127.0.0.2", 0)
        )
        assert (await c.reply()).startswith("220 ")
        c.close()


# ---------------------------------------------------------------- recipients and relay


@pytest.mark.asyncio
async def test_unknown_local_user_550_and_relay_denied(backend):
    c = await RawSMTP.connect(backend.bound_port("mxplain"))
    await c.reply()
    await c.cmd("EHLO x.example")
    await c.cmd("MAIL FROM:<carol@remote.example>")
    assert (await c.cmd("RCPT TO:<nobody@example.org>")).startswith("550 5.1.1")
    assert (await c.cmd("RCPT TO:<victim@elsewhere.net>")).startswith("554 5.7.1")
    assert (await c.cmd("RCPT TO:<team@example.org>")).startswith("250")  # one-to-many alias
    await c.cmd("DATA")
    assert (await c.cmd(MSG.encode() + b".\r\n")).startswith("250")
    await wait_for(lambda: maildir_files(backend.tmp, ALICE) and maildir_files(backend.tmp, BOB))
    [entry] = queue_rows(backend)
    assert sorted(r.address for r in entry.recipients) == [ALICE, BOB]


RELAY_DISGUISES = [
    "<@example.org:victim@elsewhere.net>",
    "<victim%elsewhere.net@example.org>",
    '<"victim@elsewhere.net"@example.org>',
    "<elsewhere.net!victim@example.org>",
    "<elsewhere.net!victim>",
    "<victim@elsewhere.net@example.org>",
    "<alice@example.org.>",
    "<victim@elsewhere.net.>",
    "<alice@[127.0.0.1]>",
    "<alice@example.org",
    "<alice\x00@example.org>",
    "victim@elsewhere.net",
]


@pytest.mark.asyncio
@pytest.mark.parametrize("path", RELAY_DISGUISES)
async def test_relay_disguises_5xx_and_nothing_queued(backend, path):
    c = await RawSMTP.connect(backend.bound_port("mxplain"))
    await c.reply()
    await c.cmd("EHLO x.example")
    await c.cmd("MAIL FROM:<carol@remote.example>")
    reply = await c.cmd(b"RCPT TO:" + path.encode() + b"\r\n")
    assert reply[0] == "5", reply
    # A DATA attempt after the refused RCPT must not queue anything either.
    assert (await c.cmd("DATA"))[0] == "5"
    await c.cmd("QUIT")
    assert queue_rows(backend) == []


# ---------------------------------------------------------------- smuggling and line endings

SMUGGLE = {
    "lf-dot-crlf": b"\n.\r\n",
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
}


@pytest.mark.asyncio
@pytest.mark.parametrize("seq", SMUGGLE.values(), ids=SMUGGLE.keys())
async def test_smuggling_sequences_do_not_end_data(backend, seq):
    c = await RawSMTP.connect(backend.bound_port("mxplain"))
    await c.reply()
    await c.cmd("EHLO x.example")
    await c.cmd("MAIL FROM:<carol@remote.example>")
    await c.cmd("RCPT TO:<alice@example.org>")
    assert (await c.cmd("DATA")).startswith("354")
    smuggled = (
        b"From: carol@remote.example\r\nSubject: s\r\n\r\nfirst" + seq
        + b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nFrom: admin@example.org\r\n\r\nsmuggled\r\n"
    )
    await c.send(smuggled)
    await c.send(b".\r\n")
    reply = await c.reply()
    assert reply.startswith("250"), reply
    await c.cmd("QUIT")
    rows = queue_rows(backend)
    assert len(rows) == 1  # one message, the smuggled one is just body text
    assert [r.address for r in rows[0].recipients] == [ALICE]
    stored = Queue(backend.config.queue_db, group_commit=False).content(rows[0].id)
    # CRLF-canonical: no lone CR or LF survives.
    assert b"\r\n" in stored
    assert stored.replace(b"\r\n", b"").count(b"\n") == 0 and stored.replace(b"\r\n", b"").count(b"\r") == 0
    assert maildir_files(backend.tmp, BOB) == []


@pytest.mark.asyncio
async def test_bare_lf_commands_accepted_and_cr_in_command_refused(backend):
    c = await RawSMTP.connect(backend.bound_port("mxplain"))
    await c.reply()
    assert (await c.cmd(b"EHLO x.example\n")).startswith("250")
    assert (await c.cmd(b"MAIL FROM:<carol@remote.example>\rRCPT TO:<bob@example.org>\r\n"))[0] == "5"


# ---------------------------------------------------------------- limits


@pytest.mark.asyncio
async def test_size_recipients_and_loop_limits(backend):
    c = await RawSMTP.connect(backend.bound_port("small"))
    await c.reply()
    assert "SIZE 2048" in await c.cmd("EHLO x.example")
    assert (await c.cmd("MAIL FROM:<carol@remote.example> SIZE=100000")).startswith("552 5.3.4")
    assert (await c.cmd("MAIL FROM:<carol@remote.example>")).startswith("250")
    assert (await c.cmd("RCPT TO:<alice@example.org>")).startswith("250")
    assert (await c.cmd("RCPT TO:<bob@example.org>")).startswith("250")
    assert (await c.cmd("RCPT TO:<postmaster@example.org>")).startswith("452 4.5.3")
    await c.cmd("DATA")
    big = b"From: carol@remote.example\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100
    assert (await c.cmd(big + b".\r\n")).startswith("552 5.3.4")
    # The session goes on: a looping message is refused with 554 5.4.6.
    await c.cmd("MAIL FROM:<carol@remote.example>")
    await c.cmd("RCPT TO:<alice@example.org>")
    await c.cmd("DATA")
    looped = b"".join(b"Received: from hop%d by x; Sat, 1 Jan 2000 00:00:00 +0000\r\n" % i for i in range(6))
    assert (await c.cmd(looped + b"From: carol@remote.example\r\n\r\nx\r\n.\r\n")).startswith("554 5.4.6")
    await c.cmd("QUIT")
    assert queue_rows(backend) == []


# ---------------------------------------------------------------- submission


async def _submit(port, user, password, sender, rcpt, from_header=None, tls="starttls"):
    msg = MSG.replace("From: Carol <carol@remote.example>", f"From: {from_header or sender}")
    kwargs = dict(hostname="127.0.0.1", port=port, tls_context=client_tls())
    if tls == "implicit":
        kwargs["use_tls"] = True
    else:
        kwargs["start_tls"] = True
    async with aiosmtplib.SMTP(**kwargs) as smtp:
        await smtp.login(user, password)
        errors, reply = await smtp.sendmail(sender, [rcpt], msg.encode())
        return reply


@pytest.mark.asyncio
@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_submission_with_auth_is_queued(backend, tls):
    port = backend.bound_port("submission" if tls == "starttls" else "submissions")
    reply = await _submit(port, ALICE, ALICE_PW, ALICE, "friend@remote.example", tls=tls)
    assert reply.startswith("2.0.0 OK: queued as")
    [entry] = queue_rows(backend)
    assert entry.auth_user == ALICE and entry.sender == ALICE
    assert [(r.address, r.state, r.local) for r in entry.recipients] == [("friend@remote.example", "queued", False)]


@pytest.mark.asyncio
async def test_auth_before_tls_538(backend):
    c = await RawSMTP.connect(backend.bound_port("submission"))
    await c.reply()
    ehlo = await c.cmd("EHLO phone")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo
    blob = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
    assert (await c.cmd(f"AUTH PLAIN {blob}")).startswith("538 5.7.11")
    assert (await c.cmd("MAIL FROM:<alice@example.org>")).startswith("530 5.7.0")


@pytest.mark.asyncio
async def test_wrong_password_535_then_rate_limited(backend):
    port = backend.bound_port("submission")  # auth_max_failures = 3
    c = await RawSMTP.connect(port)
    await c.reply()
    await c.cmd("EHLO phone")
    await c.cmd("STARTTLS")
    await c.starttls()
    await c.cmd("EHLO phone")
    bad = base64.b64encode(f"\0{ALICE}\0wrong".encode()).decode()
    for _ in range(3):
        assert (await c.cmd(f"AUTH PLAIN {bad}")).startswith("535 5.7.8")
    assert (await c.cmd(f"AUTH PLAIN {bad}")).startswith("421 4.7.0")
    assert await c.closed_without_banner()
    # The right password from the same client is refused too while the window lasts.
    with pytest.raises(aiosmtplib.SMTPException):
        await _submit(port, ALICE, ALICE_PW, ALICE, "friend@remote.example")
    assert queue_rows(backend) == []


@pytest.mark.asyncio
async def test_spoofed_sender_and_from_553(backend):
    port = backend.bound_port("submission")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as e:
        await _submit(port, ALICE, ALICE_PW, BOB, "friend@remote.example")
    assert e.value.code == 553 and "5.7.1" in e.value.message
    with pytest.raises(aiosmtplib.SMTPDataError) as e2:
        await _submit(port, ALICE, ALICE_PW, ALICE, "friend@remote.example", from_header=BOB)
    assert e2.value.code == 553
    # An alias that delivers to alice is hers to send as.
    assert (await _submit(port, ALICE, ALICE_PW, "postmaster@example.org", "friend@remote.example")).startswith("2.0.0")
    assert len(queue_rows(backend)) == 1


def test_submission_with_swaks(backend_sync):
    require_tool("swaks")
    port = backend_sync["submission"]
    r = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--tls", "--auth", "LOGIN", "--auth-user", ALICE,
         "--auth-password", ALICE_PW, "--from", ALICE, "--to", "friend@remote.example", "--h-From", ALICE],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 OK: queued as" in r.stdout


# ---------------------------------------------------------------- lan


@pytest.mark.asyncio
async def test_lan_trusted_submits_without_auth(backend):
    def send():
        with smtplib.SMTP("127.0.0.1", backend.bound_port("lan")) as s:
            s.ehlo("nas.lan")
            return s.sendmail("nas@example.org", ["someone@remote.example"],
                              "From: nas@example.org\r\nSubject: backup done\r\n\r\nok\r\n")

    assert await asyncio.to_thread(send) == {}
    [entry] = queue_rows(backend)
    assert entry.listener == "lan" and entry.auth_user is None


@pytest.mark.asyncio
async def test_lan_trusted_cannot_use_foreign_sender(backend):
    def send():
        with smtplib.SMTP("127.0.0.1", backend.bound_port("lan")) as s:
            s.sendmail("ceo@bank.example", ["someone@remote.example"], "From: ceo@bank.example\r\n\r\nx\r\n")

    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        await asyncio.to_thread(send)
    assert e.value.smtp_code == 553


@pytest.mark.asyncio
async def test_lan_untrusted_must_auth(tmp_path):
    cfg = write_config(tmp_path, listener_block("lan", "lan", trusted_networks=["10.0.0.0/8"]))
    async with running_backend(cfg) as b:
        c = await RawSMTP.connect(b.bound_port("lan"))
        await c.reply()
        await c.cmd("EHLO app")
        assert (await c.cmd("MAIL FROM:<nas@example.org>")).startswith("530 5.7.0")


# ---------------------------------------------------------------- storage faults


@pytest.mark.asyncio
async def test_queue_failure_451_and_session_recovers(backend, monkeypatch):
    """A failing disk injected at the storage layer (the real full-disk case is tested with a tmpfs
    in test_process.py): 451 4.3.0, envelope reset, next transaction on the same connection works."""
    q = backend.queue
    real_insert_op = q._insert_op
    calls = {"n": 0}

    def failing_insert_op(msg):
        # Storing the first message fails (every time it is tried: alone or in a batch).
        calls["n"] += 1
        if calls["n"] == 1:
            def insert(conn, now):
                raise OSError(28, "No space left on device")

            return insert
        return real_insert_op(msg)

    monkeypatch.setattr(q, "_insert_op", failing_insert_op)
    c = await RawSMTP.connect(backend.bound_port("mxplain"))
    await c.reply()
    await c.cmd("EHLO x.example")
    for expect in ("451 4.3.0", "250 2.0.0"):
        assert (await c.cmd("MAIL FROM:<carol@remote.example>")).startswith("250")
        await c.cmd("RCPT TO:<alice@example.org>")
        await c.cmd("DATA")
        reply = await c.cmd(MSG.encode() + b".\r\n")
        assert reply.startswith(expect), reply
        assert "Traceback" not in reply and "Error:" not in reply
    assert len(queue_rows(backend)) == 1


# ---------------------------------------------------------------- sync fixture for subprocess clients


@pytest.fixture
def backend_sync(tmp_path):
    """The backend in a thread with its own loop, for blocking clients such as swaks."""
    import threading

    cfg_path = write_config(tmp_path, all_listeners())
    loop = asyncio.new_event_loop()
    b = Backend(load_config(cfg_path))
    started = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(b.start())
        started.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(10)
    ports = {lc.name: b.bound_port(lc.name) for lc in b.config.listeners}
    try:
        yield ports
    finally:
        asyncio.run_coroutine_threadsafe(b.stop(grace=0.5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


# ---------------------------------------------------------------- metrics


@pytest.mark.asyncio
async def test_metrics_endpoint_counts_outcomes(tmp_path):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    cfg_path = write_config(
        tmp_path,
        listener_block("mx", "mx") + listener_block("sub", "submission", auth_failure_delay=0),
        server_extra='metrics_listen = "127.0.0.1:0"',
    )
    async with running_backend(cfg_path) as b:
        c = await RawSMTP.connect(b.bound_port("mx"))
        await c.reply()
        await c.cmd("EHLO x.example")
        await c.cmd("MAIL FROM:<carol@remote.example>")
        assert (await c.cmd("RCPT TO:<nobody@example.org>")).startswith("550")
        await c.cmd("RCPT TO:<alice@example.org>")
        await c.cmd("DATA")
        await c.cmd(MSG.encode() + b".\r\n")
        await c.cmd("QUIT")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await _submit(b.bound_port("sub"), ALICE, "wrong", ALICE, "x@remote.example")
        await wait_for(lambda: maildir_files(tmp_path, ALICE))
        port = b.metrics_server[0].server_port

        def scrape():
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            out = {}
            for fam in text_string_to_metric_families(body):
                for s in fam.samples:
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
            return out

        m = await asyncio.to_thread(scrape)
        assert m[("homemx_backend_messages_received_total", (("listener", "mx"), ("result", "accepted")))] == 1
        assert m[("homemx_backend_rejections_total", (("listener", "mx"), ("reason", "unknown_user")))] == 1
        # aiosmtplib tries each offered mechanism (PLAIN, LOGIN) before giving up.
        assert m[("homemx_backend_auth_failures_total", (("listener", "sub"),))] >= 1
        assert m[("homemx_backend_maildir_deliveries_total", (("result", "delivered"),))] == 1
        assert m[("homemx_backend_queue_recipients", (("state", "delivered"),))] == 1
        assert ("homemx_backend_queue_oldest_age_seconds", ()) in m
    # Stopped means closed: the metrics listener does not stay bound, completing handshakes nobody
    # answers (a restart in the same process would find the port taken).
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.asyncio
async def test_submissions_behind_proxy_tls_after_header(tmp_path):
    """Port 465 behind the gateway: PROXY v2 header in cleartext, then implicit TLS."""
    import socket as socketmod

    cfg_path = write_config(
        tmp_path,
        listener_block("smtps", "submissions", proxy_protocol=True, trusted_proxies=["127.0.0.1/32"]),
    )
    async with running_backend(cfg_path) as b:
        sock = socketmod.create_connection(("127.0.0.1", b.bound_port("smtps")))
        sock.sendall(encode_proxy_v2(REAL_CLIENT, ("198.51.100.1", 465)))
        sock.setblocking(False)
        async with aiosmtplib.SMTP(sock=sock, hostname="127.0.0.1", use_tls=True, tls_context=client_tls()) as smtp:
            await smtp.login(ALICE, ALICE_PW)
            _, reply = await smtp.sendmail(ALICE, ["friend@remote.example"], MSG.replace("carol@remote.example", ALICE).encode())
        assert reply.startswith("2.0.0 OK: queued as")
        [entry] = queue_rows(b)
        assert entry.client_addr == REAL_CLIENT[0]
        stored = Queue(b.config.queue_db, group_commit=False).content(entry.id)
        assert b"[203.0.113.7]" in stored and b"with ESMTPSA" in stored


@pytest.mark.asyncio
async def test_paused_delivery_queues_remote_and_still_delivers_local(tmp_path):
    cfg_path = write_config(
        tmp_path,
        listener_block("lan", "lan", trusted_networks=["127.0.0.0/8"]),
        extra='[delivery]\npaused = true\nnameservers = ["127.0.0.1"]\ndns_port = 9\n',
    )
    async with running_backend(cfg_path) as b:
        def send():
            with smtplib.SMTP("127.0.0.1", b.bound_port("lan")) as s:
                s.sendmail("nas@example.org", ["alice@example.org", "someone@remote.example"],
                           "From: nas@example.org\r\nSubject: s\r\n\r\nx\r\n")

        await asyncio.to_thread(send)
        await wait_for(lambda: maildir_files(tmp_path, ALICE))
        await b.runner.run_once()
        [entry] = queue_rows(b)
        remote = [r for r in entry.recipients if not r.local][0]
        assert (remote.state, remote.attempts) == ("queued", 0)


@pytest.mark.asyncio
async def test_data_rules_long_line_transparency_pipelining(backend):
    c = await RawSMTP.connect(backend.bound_port("mxplain"))
    await c.reply()
    await c.cmd("EHLO x.example")
    # A line longer than the limit: the whole message is refused, the session goes on.
    await c.cmd("MAIL FROM:<carol@remote.example>")
    await c.cmd("RCPT TO:<alice@example.org>")
    await c.cmd("DATA")
    assert (await c.cmd(b"From: carol@remote.example\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n")).startswith("500 5.5.2")
    # Transparency (a leading dot is removed, RFC 5321 4.5.2), a message split into many small
    # writes, and the next command pipelined right behind the final dot.
    await c.cmd("MAIL FROM:<carol@remote.example>")
    await c.cmd("RCPT TO:<alice@example.org>")
    assert (await c.cmd("DATA")).startswith("354")
    body = b"From: carol@remote.example\r\nSubject: dots\r\n\r\n..leading dot\r\n.\r\n"
    head, terminator = body[:-5], body[-5:]
    for i in range(0, len(head), 7):
        await c.send(head[i : i + 7])
    await c.send(terminator + b"QUIT\r\n")
    assert (await c.reply()).startswith("250 2.0.0 OK: queued as")
    assert (await c.reply()).startswith("221")
    files = await wait_for(lambda: maildir_files(backend.tmp, ALICE))
    text = files[0].read_text()
    assert "\n.leading dot\n" in text and "..leading" not in text
