"""The rspamd client (backend/auth/rspamd.py) against a real rspamd (tests/lab/rspamd.py), and the
faults we can make real: rspamd stopped, a socket that never answers, an HTTP server that answers
nonsense."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid

import pytest

from backend.auth.results import SpamVerdict
from backend.auth.rspamd import RspamdClient, is_junk, parse_reply, RspamdUnavailable, smtp_reply_for
from backend.metrics import BackendMetrics
from backend.smtp import replies as R
from tests.lab.ports import free_port
from tests.lab.rspamd import GTUBE_ADD_HEADER, GTUBE_REJECT as GTUBE, GTUBE_REWRITE_SUBJECT, Rspamd

CLIENT_IP = "192.0.2.10"  # TEST-NET-1: not in rspamd's local_addrs, so it is scanned as an outsider's
HELO = "mail.sender.example"


def message(body: bytes = b"Shall we have lunch tomorrow at noon? The usual place.", subject: str = "lunch") -> bytes:
    return (
        b"From: Alice <alice@sender.example>\r\n"
        b"To: Bob <bob@home.example>\r\n"
        + f"Subject: {subject}\r\n".encode()
        + b"Date: Thu, 03 Dec 2026 09:00:00 +0000\r\n"
        + f"Message-ID: <{uuid.uuid4().hex}@sender.example>\r\n".encode()
        + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + body + b"\r\n"
    )


def envelope(**over) -> dict:
    env = dict(
        ip=CLIENT_IP, helo=HELO, sender="alice@sender.example", recipients=["bob@home.example"], user=None,
        queue_id=uuid.uuid4().hex[:12].upper(),
        # The client's name from a verified PTR: given, rspamd does not look one up (our lab resolver
        # refuses, and "no PTR" would score the clean message as spam).
        hostname=HELO,
    )
    env.update(over)
    return env


@pytest.fixture(scope="module")
def rspamd():
    with Rspamd() as rs:
        yield rs


def sample(metrics: BackendMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def state_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "homemx.auth.rspamd"]


# ------------------------------------------------------------------ the real rspamd


@pytest.mark.asyncio
async def test_gtube_is_rejected_with_550(rspamd):
    client = RspamdClient(rspamd.url, timeout=10)
    try:
        verdict = await client.check(message(GTUBE, "test"), **envelope())
    finally:
        await client.close()
    assert verdict.available and verdict.action == "reject"
    assert "GTUBE" in verdict.symbols
    assert smtp_reply_for(verdict) == R.R550_SPAM and R.R550_SPAM.startswith("550 5.7.1 ")
    assert not is_junk(verdict)


@pytest.mark.asyncio
async def test_clean_message_is_no_action_with_the_x_spam_fields(rspamd):
    metrics = BackendMetrics()
    client = RspamdClient(rspamd.url, timeout=10, metrics=metrics)
    try:
        verdict = await client.check(message(), **envelope())
    finally:
        await client.close()
    assert verdict.available and verdict.action == "no action", verdict
    assert verdict.score < verdict.required_score == 15.0
    assert smtp_reply_for(verdict) is None and not is_junk(verdict)
    fields = dict(verdict.headers)
    assert fields["X-Spam-Status"].startswith("No, score=")
    assert fields["X-Spamd-Result"].startswith("default: False [")
    assert sample(metrics, "homemx_backend_spam_actions_total", action="no action") == 1
    assert sample(metrics, "homemx_backend_rspamd_check_seconds_count") == 1
    assert sample(metrics, "homemx_backend_rspamd_available") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("pattern, action", [(GTUBE_ADD_HEADER, "add header"), (GTUBE_REWRITE_SUBJECT, "rewrite subject")])
async def test_junk_actions_are_taken_into_junk(rspamd, pattern, action):
    client = RspamdClient(rspamd.url, timeout=10)
    try:
        verdict = await client.check(message(pattern, "test"), **envelope())
    finally:
        await client.close()
    assert verdict.available and verdict.action == action
    assert is_junk(verdict) and smtp_reply_for(verdict) is None


@pytest.mark.asyncio
async def test_a_spammy_score_goes_to_junk_at_once_not_greylisted(rspamd):
    # No Hostname: rspamd looks the client's PTR up itself, the lab resolver refuses, and the
    # message scores 6.3 (RDNS_NONE, HFILTER_HOSTNAME_UNKNOWN, ...): add header. rspamd's greylist
    # module (active with Redis) would answer soft reject to such a message the first time.
    client = RspamdClient(rspamd.url, timeout=10)
    try:
        verdicts = [await client.check(message(), **envelope(hostname=None)) for _ in range(2)]
    finally:
        await client.close()
    assert [v.action for v in verdicts] == ["add header", "add header"], verdicts
    assert "RDNS_NONE" in verdicts[0].symbols and is_junk(verdicts[0])
    fields = dict(verdicts[0].headers)
    assert fields["X-Spam-Status"].startswith("Yes, score=") and fields["X-Spam-Level"].startswith("******")


@pytest.mark.asyncio
async def test_client_address_helo_envelope_and_user_reach_rspamd(rspamd):
    outsider = envelope(recipients=["bob@home.example", "carol@home.example"])
    submitter = envelope(user="bob@home.example")
    client = RspamdClient(rspamd.url, timeout=10)
    try:
        verdict = await client.check(message(), **outsider)
        assert (await client.check(message(), **submitter)).available
    finally:
        await client.close()
    assert verdict.available
    # rspamd's own summary line for a Queue-Id names what it was told.
    line = rspamd.task_log(outsider["queue_id"])
    assert f"ip: {CLIENT_IP}," in line
    assert "from: <alice@sender.example>," in line
    assert "rcpts: <bob@home.example,carol@home.example>" in line
    # The HELO name: rspamd's hfilter looked it up (the lab resolver refuses: "does not resolve").
    # hfilter skips authenticated users, hence the outsider.
    assert "HFILTER_HELO_NORES_A_OR_MX" in verdict.symbols and f"HFILTER_HELO_NORES_A_OR_MX(0.30){{{HELO};}}" in line
    assert "user: bob@home.example," in rspamd.task_log(submitter["queue_id"])


@pytest.mark.asyncio
async def test_a_helo_with_a_control_character_is_still_scanned(rspamd):
    # aiosmtpd hands over what the client wrote up to the line end; a CR inside would end our
    # request header early (aiohttp refuses it with ValueError).
    env = envelope(helo="mail\rsender.example", user="bob@home.example")
    client = RspamdClient(rspamd.url, timeout=10)
    try:
        verdict = await client.check(message(), **env)
    finally:
        await client.close()
    assert verdict.available and verdict.action == "no action"
    assert "user: bob@home.example," in rspamd.task_log(env["queue_id"])


@pytest.mark.asyncio
async def test_null_sender_is_sent_as_empty_reverse_path(rspamd):
    env = envelope(sender="")
    client = RspamdClient(rspamd.url, timeout=10)
    try:
        verdict = await client.check(message(), **env)
    finally:
        await client.close()
    assert verdict.available
    line = rspamd.task_log(env["queue_id"])
    assert line and "from: <" not in line


@pytest.mark.asyncio
async def test_rspamd_does_not_run_its_own_spf_dkim_dmarc_arc(rspamd):
    # A signed message from a domain with (in this lab) no DNS: rspamd's spf, dkim, dmarc and arc
    # modules would each add a symbol (R_SPF_DNSFAIL, R_DKIM_TEMPFAIL, ...); homemx checks these itself.
    signed = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.example; s=sel; h=from:subject; bh=AAAA; b=AAAA\r\n"
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=sender.example; s=sel; b=AAAA\r\n" + message()
    )
    client = RspamdClient(rspamd.url, timeout=10)
    try:
        verdict = await client.check(signed, **envelope())
    finally:
        await client.close()
    assert verdict.available
    ours = [s for s in verdict.symbols if s.startswith(("R_SPF_", "R_DKIM_", "DMARC_", "ARC_"))]
    assert ours == [], ours


def test_learning_through_the_controller(rspamd):
    before = rspamd.stat()["learned"]
    assert rspamd.redis.keys("BAYES_*") == []
    spam = message(b"cheap pills online pharmacy discount offer limited time click here now " * 4, "offer")
    ham = message(b"the minutes of yesterday's meeting are attached, please review them before friday " * 4)
    for command, text in (("learn_spam", spam), ("learn_ham", ham)):
        r = rspamd.rspamc(command, text)
        assert r.returncode == 0 and b"success = true;" in r.stdout, (r.stdout, r.stderr)
    assert rspamd.stat()["learned"] == before + 2
    # Learning the same message again is refused: rspamd remembers what it learned.
    again = rspamd.rspamc("learn_spam", spam)
    assert b"already learned" in again.stdout and b"success = true;" not in again.stdout, again.stdout
    # The statistics are in our own Redis.
    assert {f["type"] for f in rspamd.stat()["statfiles"]} == {"redis"}
    assert sorted(rspamd.redis.keys("BAYES_*")) == ["BAYES_HAM_keys", "BAYES_SPAM_keys"]


# ------------------------------------------------------------------ faults


@pytest.mark.asyncio
async def test_rspamd_stopped_fails_open_with_one_log_line_each_way(caplog):
    caplog.set_level(logging.INFO, logger="homemx.auth.rspamd")
    metrics = BackendMetrics()
    with Rspamd() as rs:
        client = RspamdClient(rs.url, timeout=5, metrics=metrics)
        try:
            assert (await client.check(message(), **envelope())).available
            rs.stop()
            down = [await client.check(message(), **envelope()) for _ in range(3)]
            assert all(v.action == "no action" and not v.available and v.reason for v in down), down
            assert smtp_reply_for(down[0]) is None and not is_junk(down[0])
            assert sample(metrics, "homemx_backend_rspamd_available") == 0
            assert sample(metrics, "homemx_backend_spam_actions_total", action="unavailable") == 3
            lines = state_lines(caplog)
            assert len(lines) == 1 and "unavailable" in lines[0] and "accepted unscanned" in lines[0], lines

            rs.start()
            back = [await client.check(message(), **envelope()) for _ in range(2)]
            assert all(v.available and v.action == "no action" for v in back), back
            assert sample(metrics, "homemx_backend_rspamd_available") == 1
            lines = state_lines(caplog)
            assert len(lines) == 2 and "answers again" in lines[1], lines
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_fail_closed_answers_451_while_rspamd_is_unreachable(caplog):
    # Nothing listens on this port: every connection is refused.
    url = f"http://127.0.0.1:{free_port()}"
    client = RspamdClient(url, timeout=5, fail_closed=True)
    try:
        verdict = await client.check(message(), **envelope())
    finally:
        await client.close()
    assert verdict == SpamVerdict(action="soft reject", available=False, reason=verdict.reason)
    assert "ClientConnectorError" in verdict.reason
    assert smtp_reply_for(verdict) == R.R451_SPAM_TEMP and R.R451_SPAM_TEMP.startswith("451 4.7.1 ")
    assert any("refused with 451 4.7.1" in line for line in state_lines(caplog))


@pytest.mark.asyncio
async def test_rspamd_that_never_answers_is_cut_off_at_the_timeout():
    # A listening socket nobody accepts from: the kernel completes the handshake and takes the
    # request, and no reply ever comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        client = RspamdClient(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        started = time.monotonic()
        try:
            verdict = await client.check(message(), **envelope())
        finally:
            await client.close()
        elapsed = time.monotonic() - started
    assert not verdict.available and verdict.action == "no action"
    assert verdict.reason == "no answer within 0.5 s"
    assert elapsed < 5  # liveness: bounded by the timeout, not by rspamd


async def _serve_once(response: bytes):
    """An HTTP server on loopback that reads a request and answers ``response`` (a real peer that
    speaks HTTP but not rspamd)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        writer.write(response)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "response, reason",
    [
        (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}", "HTTP 500"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot json!", "reply is not JSON"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\nConnection: close\r\n\r\n{"action":"spam"}',
         "reply has no known action ('spam')"),
    ],
)
async def test_an_answer_that_is_not_a_verdict_counts_as_unavailable(response, reason):
    server = await _serve_once(response)
    port = server.sockets[0].getsockname()[1]
    client = RspamdClient(f"http://127.0.0.1:{port}", timeout=5)
    try:
        verdict = await client.check(message(), **envelope())
    finally:
        await client.close()
        server.close()
        await server.wait_closed()
    assert verdict == SpamVerdict(action="no action", available=False, reason=reason)


# ------------------------------------------------------------------ the reply, without a socket


def test_reply_header_fields_keep_folding_and_drop_injected_lines():
    verdict = parse_reply(
        b'{"action": "add header", "score": 7.5, "required_score": 15, "symbols": {"B": {}, "A": {}},'
        b' "milter": {"add_headers": {'
        b'"X-Spamd-Result": {"value": "default: True [7.50 / 15.00];\\r\\n\\tA(1.00)[]", "order": 0},'
        b'"X-Spam-Level": "*******",'
        b'"X-Evil": {"value": "x\\r\\nBcc: victim@example.org", "order": 0},'
        b'"Bad Name": {"value": "x", "order": 0},'
        b'"X-Twice": [{"value": "1", "order": 2}, {"value": "2", "order": 1}]}}}'
    )
    assert verdict.action == "add header" and verdict.score == 7.5 and verdict.symbols == ("A", "B")
    assert is_junk(verdict) and smtp_reply_for(verdict) is None
    assert verdict.headers == (
        ("X-Spamd-Result", "default: True [7.50 / 15.00];\r\n\tA(1.00)[]"),
        ("X-Spam-Level", "*******"),
        ("X-Twice", "2"),
        ("X-Twice", "1"),
    )


@pytest.mark.parametrize("action, reply", [
    ("no action", None), ("add header", None), ("rewrite subject", None),
    ("greylist", R.R451_SPAM_TEMP), ("soft reject", R.R451_SPAM_TEMP), ("reject", R.R550_SPAM),
])
def test_every_action_maps_to_its_smtp_answer(action, reply):
    verdict = parse_reply(f'{{"action": "{action}", "score": 1, "required_score": 15}}'.encode())
    assert smtp_reply_for(verdict) == reply
    assert is_junk(verdict) == (action in ("add header", "rewrite subject"))


def test_a_reply_without_a_number_for_a_score_is_refused():
    with pytest.raises(RspamdUnavailable, match="score"):
        parse_reply(b'{"action": "reject", "score": "high"}')
