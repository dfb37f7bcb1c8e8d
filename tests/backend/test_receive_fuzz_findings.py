"""What the SMTP fuzzer (tests/bench/fuzz.py) found on the backend, each over real sockets: a reset
during a pipelined TLS session, an AUTH answer longer than a line may be, an AUTH argument made of
whitespace only Unicode calls whitespace, addresses that are not UTF-8, and connections that go
in the middle of a STARTTLS handshake or of a PROXY header.

The backend runs in-process on loopback ports chosen by the OS. Clients that must reset
(SO_LINGER 0) or send raw TLS bytes are blocking sockets run in a thread."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
import time

import pytest

from backend.config import load_config
from backend.queue.store import Queue
from backend.run import Backend
from tests.backend.helpers import (
    ALICE,
    RawSMTP,
    client_tls,
    listener_block,
    running_backend,
    wait_for,
    write_config,
)

GATEWAY = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}
LOUD_ASYNCIO = "socket.send() raised exception"


def reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_reply(f) -> bytes:
    line = f.readline()
    while line[3:4] == b"-":
        line = f.readline()
    return line


def plain_until_starttls(port: int, pipelined: bytes = b"") -> socket.socket:
    """Banner, EHLO, STARTTLS (with ``pipelined`` right behind it) answered 220: the next bytes
    are the client's TLS handshake."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    with s.makefile("rb") as f:  # closed here: an open makefile() would keep the socket open
        assert f.readline().startswith(b"220 ")
        s.sendall(b"EHLO client.example\r\n")
        assert read_reply(f).startswith(b"250 ")
        s.sendall(b"STARTTLS\r\n" + pipelined)
        assert f.readline().startswith(b"220 ")
    return s


def outcomes(caplog) -> list[str]:
    return re.findall(r"outcome=(\S+)", caplog.text)


# ---------------------------------------------------------------- 1. reset under pipelined TLS commands


@pytest.mark.asyncio
async def test_reset_under_pipelined_tls_commands_answers_none_into_the_dead_socket(tmp_path, caplog):
    """150 pipelined HELPs inside TLS, then an RST: the session kept answering the buffered
    commands into the dead connection (asyncio's TLS transport does not say it is closing, so
    nothing yielded), and asyncio logged one 'socket.send() raised exception' WARNING per reply
    after the fifth (145 lines). It must stop at the first failed write: no warning, one outcome."""
    caplog.set_level(logging.INFO)
    async with running_backend(write_config(tmp_path, listener_block("mx", "mx"))) as b:
        port = b.bound_port("mx")

        def client() -> None:
            s = plain_until_starttls(port)
            t = client_tls().wrap_socket(s, server_hostname="x")
            t.sendall(b"HELP\r\n" * 150)
            reset(t)

        for _ in range(3):  # the RST must arrive between two replies; three rounds make it likely
            await asyncio.to_thread(client)
        await wait_for(lambda: len(outcomes(caplog)) == 3)
        await wait_for(lambda: not b.sessions.sessions)
        # The server goes on serving.
        c = await RawSMTP.connect(port)
        assert (await c.reply()).startswith("220 ")
        assert (await c.cmd("QUIT")).startswith("221")
        c.close()
        await wait_for(lambda: len(outcomes(caplog)) == 4)
    assert caplog.text.count(LOUD_ASYNCIO) == 0
    assert len(outcomes(caplog)) == 4


# ---------------------------------------------------------------- 2, 3. AUTH edge cases


async def submission_after_starttls(port: int) -> RawSMTP:
    c = await RawSMTP.connect(port)
    assert (await c.reply()).startswith("220 ")
    await c.cmd("EHLO client.example")
    assert (await c.cmd("STARTTLS")).startswith("220")
    await c.starttls()
    assert (await c.cmd("EHLO client.example")).startswith("250")
    return c


@pytest.mark.asyncio
@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
async def test_overlong_auth_answer_is_500_5_5_6_a_failed_auth_and_the_line_is_discarded(tmp_path, caplog, mechanism):
    """RFC 4954 4: an answer longer than the server's buffer gets '500 5.5.6 Authentication
    Exchange line is too long'. aiosmtpd's readline() raised ValueError past 64 KiB (451 4.3.0 and
    an ERROR line), dropped what it had read and took the rest of the line for a command."""
    caplog.set_level(logging.INFO)
    cfg = write_config(tmp_path, listener_block("submission", "submission", auth_failure_delay=0))
    async with running_backend(cfg) as b:
        c = await submission_after_starttls(b.bound_port("submission"))
        assert (await c.cmd(f"AUTH {mechanism}")).startswith("334")
        # Base64 letters, then something that would be a command if read as one.
        assert (await c.cmd(b"A" * 70_000 + b" NOOP\r\n")) .startswith("500 5.5.6 ")
        assert (await c.cmd("NOOP")).startswith("250 ")  # nothing of the long line was run
        assert (await c.cmd("QUIT")).startswith("221 ")
        await wait_for(lambda: outcomes(caplog))
    assert "AUTH failed (1 in window)" in caplog.text
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    assert "500 5.5.1" not in caplog.text  # no part of the line was read as a command


@pytest.mark.asyncio
@pytest.mark.parametrize("arg", [b"\x1c", b"\x1d", b"\x1e", b"\x1f", b"\xc2\x85", b"\x1c \x1f"])
async def test_auth_with_only_unicode_whitespace_is_a_syntax_error(tmp_path, caplog, arg):
    """aiosmtpd strips the argument as bytes but splits it as text, where these code points are
    whitespace: AUTH's mechanism was split()[0] of nothing, an IndexError (451 4.3.0, ERROR)."""
    caplog.set_level(logging.INFO)
    async with running_backend(write_config(tmp_path, listener_block("submission", "submission"))) as b:
        c = await submission_after_starttls(b.bound_port("submission"))
        assert (await c.cmd(b"AUTH " + arg + b"\r\n")).startswith("501 5.5.4 ")
        assert (await c.cmd("NOOP")).startswith("250 ")
        assert (await c.cmd("QUIT")).startswith("221 ")
        await wait_for(lambda: outcomes(caplog))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# ---------------------------------------------------------------- 4. addresses that are not UTF-8


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "mail, rcpt",
    [
        (b"MAIL FROM:<a\xffb@remote.test>", None),
        (b"MAIL FROM:<carol@r\xc3emote.test>", None),
        (b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<al\xe9ice@example.org>"),
        (b"MAIL FROM:<carol@remote.test>", b"RCPT TO:<alice@exa\xed\xa0\x80mple.org>"),  # an encoded surrogate
    ],
)
async def test_address_that_is_not_utf8_is_refused_at_mail_or_rcpt(tmp_path, caplog, mail, rcpt):
    """RFC 6531 3.3: a non-ASCII address is UTF-8. Other bytes passed MAIL and RCPT (aiosmtpd keeps
    them as surrogates) and the commit failed at the dot: 451 4.3.0 and a UnicodeEncodeError
    traceback. They are a syntax error of the path, answered at once."""
    caplog.set_level(logging.INFO)
    async with running_backend(write_config(tmp_path, listener_block("mx", "mx"))) as b:
        c = await RawSMTP.connect(b.bound_port("mx"))
        assert (await c.reply()).startswith("220 ")
        assert (await c.cmd("EHLO client.example")).startswith("250")
        if rcpt is None:
            assert (await c.cmd(mail + b"\r\n")).startswith("501 5.1.3 ")
        else:
            assert (await c.cmd(mail + b"\r\n")).startswith("250 ")
            assert (await c.cmd(rcpt + b"\r\n")).startswith("501 5.1.3 ")
            assert (await c.cmd(f"RCPT TO:<{ALICE}>")).startswith("250 ")  # the session goes on
            assert (await c.cmd("DATA")).startswith("354")
            assert (await c.cmd(b"Subject: x\r\n\r\nhi\r\n.\r\n")).startswith("250 ")
        assert (await c.cmd("QUIT")).startswith("221")
        await wait_for(lambda: outcomes(caplog))
        rows = Queue(b.config.queue_db, group_commit=False).list(None)
    assert len(rows) == (0 if rcpt is None else 1)
    assert "Traceback" not in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# ---------------------------------------------------------------- 5. gone in the middle of a handshake


@pytest.mark.asyncio
@pytest.mark.parametrize("partial", [b"\x16", b"\x16\x03"])
@pytest.mark.parametrize("pipelined", [0, 200_000], ids=["alone", "200k-pipelined"])
@pytest.mark.parametrize("close", ["reset", "fin"])
async def test_connection_gone_mid_starttls_handshake_ends_the_session_at_once(tmp_path, caplog, partial, pipelined, close):
    """After '220 Ready to start TLS', a few bytes of a ClientHello and then an RST or a FIN: the
    session ends when the connection goes, with one INFO line for the handshake and one outcome
    (the idle timeout is 60 s here: ending within the liveness bound means the loss itself was
    noticed). With more than 128 KiB pipelined behind STARTTLS, the command reader had paused the
    socket's transport, nothing read it during the handshake, and the session ended only at the
    idle timeout (outcome=timeout); those bytes are dropped (RFC 3207 5) and reading resumes."""
    caplog.set_level(logging.INFO)
    async with running_backend(write_config(tmp_path, listener_block("mx", "mx", timeout=60))) as b:
        port = b.bound_port("mx")

        def client() -> None:
            s = plain_until_starttls(port, b"x" * pipelined)
            try:
                s.sendall(partial)
                if close == "reset":
                    reset(s)
                else:
                    s.shutdown(socket.SHUT_WR)
            except ConnectionResetError:
                pass  # the pipelined bytes the server read on made its handshake fail first: fine
            s.close()

        await asyncio.to_thread(client)
        await wait_for(lambda: outcomes(caplog), timeout=10)
        await wait_for(lambda: not b.sessions.sessions)
    assert outcomes(caplog) in (["tls-failed"], ["reset"])
    handshake = [r for r in caplog.records if "handshake failed" in r.getMessage()]
    assert len(handshake) == 1 and handshake[0].levelno == logging.INFO
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


# ---------------------------------------------------------------- closed during the PROXY header


@pytest.mark.asyncio
# Nothing, half of the v2 signature, all of it but the last byte (the PROXY protocol spec 2.2).
@pytest.mark.parametrize("sent", [b"", b"\r\n\r\n\x00\r", b"\r\n\r\n\x00\r\nQUIT"])
async def test_close_during_the_proxy_header_ends_the_session_at_once(tmp_path, caplog, sent):
    """A peer that closes before its PROXY header is complete was noticed only at the PROXY
    timeout and logged outcome=timeout; it is a close, noticed when it happens (the timeout here
    is 60 s, far beyond the liveness bound)."""
    caplog.set_level(logging.INFO, logger="homemx.smtp")
    b = Backend(load_config(write_config(tmp_path, listener_block("mx", "mx", **GATEWAY))), proxy_timeout=60)
    await b.start()
    try:
        c = await RawSMTP.connect(b.bound_port("mx"), prefix=sent)
        c.writer.write_eof()
        t0 = time.monotonic()
        assert await c.closed_without_banner(timeout=10)
        await wait_for(lambda: outcomes(caplog), timeout=10)
        await wait_for(lambda: not b.sessions.sessions)
        assert time.monotonic() - t0 < 10
        c.close()
    finally:
        await b.stop(grace=0.5)
    assert outcomes(caplog) == ["closed"]


# ---------------------------------------------------------------- addresses the email package cannot parse


@pytest.mark.asyncio
@pytest.mark.parametrize("arg", [b"<", b"a.\xff @", b"\xff@[ \xc2\x85"])
async def test_vrfy_of_an_unparsable_address_is_an_answer_not_an_error(tmp_path, caplog, arg):
    """aiosmtpd parses VRFY's address with the email package's header parser, which raises
    IndexError or UnboundLocalError on some input besides HeaderParseError: 451 4.3.0 and an
    ERROR line. It is an address that cannot be parsed: 502, and the session goes on."""
    caplog.set_level(logging.INFO)
    async with running_backend(write_config(tmp_path, listener_block("mx", "mx"))) as b:
        c = await RawSMTP.connect(b.bound_port("mx"))
        assert (await c.reply()).startswith("220 ")
        assert (await c.cmd("EHLO client.example")).startswith("250")
        assert (await c.cmd(b"VRFY " + arg + b"\r\n")).startswith("502 5.")
        assert (await c.cmd("QUIT")).startswith("221")
        await wait_for(lambda: outcomes(caplog))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
