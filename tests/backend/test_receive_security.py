"""The AUTH surface and the PROXY v2 edge over real sockets: no AUTH on the mx listener, one
failed-AUTH limiter for every listener keyed by client (an IPv6 /64 counts as one client), the
growing AUTH delay and the end of the window, the PROXY v2 CRC32C TLV, and the PROXY timeout.

The backend runs in-process on loopback ports chosen by the OS; clients behind the gateway are
played by a PROXY v2 header naming the address they came from."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import struct
import time

import google_crc32c
import pytest
from aiosmtpd.proxy_protocol import get_proxy

from backend.config import load_config
from backend.queue.store import Queue
from backend.run import Backend
from backend.receive.authlimit import AUTH_DELAY_MAX, auth_delay
from backend.receive.proxy import proxy_checksum_ok
from gateway.proxyv2 import encode_proxy_v2
from tests.backend.helpers import (
    ALICE,
    ALICE_PW,
    RawSMTP,
    client_tls,
    listener_block,
    running_backend,
    wait_for,
    write_config,
)

GATEWAY = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}
GOOD = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
BAD = base64.b64encode(f"\0{ALICE}\0not-the-password".encode()).decode()


def queued(b: Backend) -> list:
    return Queue(b.config.queue_db, group_commit=False).list(None)


async def starttls_session(port: int, prefix: bytes = b"") -> RawSMTP:
    """EHLO, STARTTLS, EHLO again: ready for AUTH."""
    c = await RawSMTP.connect(port, prefix=prefix)
    assert (await c.reply()).startswith("220 ")
    await c.cmd("EHLO client.example")
    assert (await c.cmd("STARTTLS")).startswith("220")
    await c.starttls()
    assert (await c.cmd("EHLO client.example")).startswith("250")
    return c


async def implicit_tls_session(port: int) -> RawSMTP:
    """Port 465 (RFC 8314): TLS from the first byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls(), server_hostname="x")
    c = RawSMTP(reader, writer)
    assert (await c.reply()).startswith("220 ")
    assert (await c.cmd("EHLO client.example")).startswith("250")
    return c


# ---------------------------------------------------------------- no AUTH on the mx listener


@pytest.mark.asyncio
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_on_mx_is_refused_even_after_starttls_with_the_right_password(tmp_path, mechanism):
    """Issue 11 point 7: port 25 hid AUTH in EHLO but answered 235 to the right password after
    STARTTLS, a password oracle outside the submission ports' policy."""
    async with running_backend(write_config(tmp_path, listener_block("mx", "mx"))) as b:
        c = await starttls_session(b.bound_port("mx"))
        if mechanism == "PLAIN":
            reply = await c.cmd(f"AUTH PLAIN {GOOD}")
        else:
            reply = await c.cmd("AUTH LOGIN " + base64.b64encode(ALICE.encode()).decode())
        assert reply.startswith("503 5.5.1"), reply
        # Not logged in: relaying as alice is still refused, and the session goes on.
        assert (await c.cmd(f"MAIL FROM:<{ALICE}>")).startswith("250")
        assert (await c.cmd("RCPT TO:<friend@remote.example>")).startswith("554 5.7.1")
        assert (await c.cmd("QUIT")).startswith("221")
        assert queued(b) == []


# ---------------------------------------------------------------- one limiter for every listener


@pytest.mark.asyncio
async def test_lockout_earned_on_465_holds_on_587(tmp_path):
    """Issue 11 point 7: the limiter was per listener, so a client locked out on 465 guessed on
    587 with a fresh budget."""
    limits = dict(auth_max_failures=3, auth_failure_delay=0)
    cfg = write_config(
        tmp_path,
        listener_block("smtps", "submissions", **limits) + listener_block("submission", "submission", **limits),
    )
    async with running_backend(cfg) as b:
        c = await implicit_tls_session(b.bound_port("smtps"))
        for _ in range(3):
            assert (await c.cmd(f"AUTH PLAIN {BAD}")).startswith("535 5.7.8")
        assert (await c.cmd(f"AUTH PLAIN {GOOD}")).startswith("421 4.7.0")
        assert await c.closed_without_banner()
        # Same client, the other submission port, the right password: still locked out.
        c = await starttls_session(b.bound_port("submission"))
        assert (await c.cmd(f"AUTH PLAIN {GOOD}")).startswith("421 4.7.0")
        assert await c.closed_without_banner()


@pytest.mark.asyncio
async def test_lockout_covers_the_clients_ipv6_slash64_and_no_other(tmp_path):
    """Issue 11 point 7: one home or server holds a whole /64, so a guesser rotating addresses
    inside it is one client; a neighbouring /64 is someone else."""
    cfg = write_config(tmp_path, listener_block("submission", "submission", auth_max_failures=2, auth_failure_delay=0, **GATEWAY))
    async with running_backend(cfg) as b:
        port = b.bound_port("submission")

        def via_gateway(client: str) -> bytes:
            return encode_proxy_v2((client, 40000), ("2001:db8:ffff::25", 587))

        c = await starttls_session(port, via_gateway("2001:db8:1:2::a"))
        for _ in range(2):
            assert (await c.cmd(f"AUTH PLAIN {BAD}")).startswith("535 5.7.8")
        c.close()
        same_64 = await starttls_session(port, via_gateway("2001:db8:1:2:ffff:ffff:ffff:fffe"))
        assert (await same_64.cmd(f"AUTH PLAIN {GOOD}")).startswith("421 4.7.0")
        other_64 = await starttls_session(port, via_gateway("2001:db8:1:3::a"))
        assert (await other_64.cmd(f"AUTH PLAIN {GOOD}")).startswith("235 2.7.0")
        other_64.close()


# ---------------------------------------------------------------- the AUTH delay and the window


def test_auth_delay_grows_with_each_failure_up_to_its_ceiling():
    assert [auth_delay(n, 0.5) for n in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 2.0]
    assert auth_delay(1000, 0.5) == AUTH_DELAY_MAX
    assert auth_delay(5, 0) == 0


@pytest.mark.asyncio
async def test_auth_delay_grows_then_the_window_ends_and_the_lockout_with_it(tmp_path, caplog):
    """Issue 11 point 11: each failure in the window is answered later than the one before (the
    server really waits: the replies come no sooner), a lockout follows the last allowed failure,
    and once the window has passed (an injected clock, not a 60 s sleep) the count starts over and
    the right password is accepted."""
    step = 0.2
    cfg = write_config(
        tmp_path,
        listener_block("submission", "submission", auth_max_failures=3, auth_failure_delay=step, auth_failure_window=60),
    )
    caplog.set_level(logging.INFO, logger="homemx.smtp")
    async with running_backend(cfg) as b:
        clock = [1000.0]
        b.auth_limiter.now = lambda: clock[0]
        port = b.bound_port("submission")
        c = await starttls_session(port)
        for n in (1, 2, 3):
            t0 = time.monotonic()
            assert (await c.cmd(f"AUTH PLAIN {BAD}")).startswith("535 5.7.8")
            assert time.monotonic() - t0 >= 0.9 * n * step  # the delay was served, no sooner
            clock[0] += 1  # the failures are spread over the window
        counts = [int(m) for m in re.findall(r"AUTH failed \((\d+) in window\)", caplog.text)]
        assert counts == [1, 2, 3]
        assert (await c.cmd(f"AUTH PLAIN {GOOD}")).startswith("421 4.7.0")
        assert await c.closed_without_banner()

        clock[0] += 56  # the first failure is 59 s old: all three are in the window, still locked out
        c = await starttls_session(port)
        assert (await c.cmd(f"AUTH PLAIN {GOOD}")).startswith("421 4.7.0")

        clock[0] += 5  # all three are older than the window
        caplog.clear()
        c = await starttls_session(port)
        assert (await c.cmd(f"AUTH PLAIN {BAD}")).startswith("535 5.7.8")
        assert re.findall(r"AUTH failed \((\d+) in window\)", caplog.text) == ["1"]
        assert (await c.cmd(f"AUTH PLAIN {GOOD}")).startswith("235 2.7.0")
        c.close()


# ---------------------------------------------------------------- PROXY v2


PP2_TYPE_CRC32C = 0x03


def proxy_header_with_crc(client: tuple[str, int], corrupt: bool) -> bytes:
    """PROXY protocol 2.2.5: the CRC32c of the whole header, computed with the checksum field
    zeroed, stored big-endian in the PP2_TYPE_CRC32C TLV (here the last TLV)."""
    zeroed = encode_proxy_v2(client, ("198.51.100.1", 25), tlvs=((0x04, b"\0" * 3), (PP2_TYPE_CRC32C, b"\0" * 4)))
    crc = google_crc32c.value(zeroed) ^ (1 if corrupt else 0)
    return zeroed[:-4] + struct.pack("!I", crc)


@pytest.mark.asyncio
@pytest.mark.parametrize("client", [("203.0.113.7", 40123), ("2001:db8::77", 40124)], ids=["ipv4", "ipv6"])
async def test_proxy_v2_crc32c_checked(tmp_path, client, caplog):
    """Issue 11 point 7: a header whose CRC32C TLV is wrong was accepted; it must close the
    connection before the banner, while the right checksum is served as usual."""
    caplog.set_level(logging.INFO, logger="homemx.smtp")
    async with running_backend(write_config(tmp_path, listener_block("mx", "mx", **GATEWAY))) as b:
        port = b.bound_port("mx")
        good = await RawSMTP.connect(port, prefix=proxy_header_with_crc(client, corrupt=False))
        assert (await good.reply()).startswith("220 ")
        assert (await good.cmd("EHLO sender.example")).startswith("250")
        assert (await good.cmd("QUIT")).startswith("221")
        bad = await RawSMTP.connect(port, prefix=proxy_header_with_crc(client, corrupt=True) + b"EHLO x\r\n")
        assert await bad.closed_without_banner()
    assert caplog.text.count("refused PROXY header: bad CRC32C") == 1


@pytest.mark.asyncio
async def test_silent_client_is_closed_at_the_injected_proxy_timeout(tmp_path, caplog):
    """Issue 11 point 11: the PROXY timeout is injectable, and a peer that sends no header is
    closed when it runs out: no banner, no 421 (the peer is not an SMTP client yet)."""
    caplog.set_level(logging.INFO, logger="homemx.smtp")
    b = Backend(load_config(write_config(tmp_path, listener_block("mx", "mx", **GATEWAY))), proxy_timeout=0.5)
    await b.start()
    try:
        c = await RawSMTP.connect(b.bound_port("mx"))
        t0 = time.monotonic()
        assert await c.closed_without_banner(timeout=5)  # liveness bound: the default is 10 s
        assert time.monotonic() - t0 >= 0.4  # and not before the timeout
    finally:
        await b.stop(grace=0.5)
    assert re.search(r"listener=mx client=127\.0\.0\.1 outcome=timeout", caplog.text)


@pytest.mark.asyncio
async def test_submissions_behind_the_gateway_without_a_tls_handshake_is_closed_at_the_proxy_timeout(tmp_path, caplog):
    """On 465 behind the gateway the PROXY header is followed by the client's TLS handshake; the
    same injected timeout bounds it (a peer that sends the header and then nothing)."""
    caplog.set_level(logging.INFO, logger="homemx.smtp")
    cfg = write_config(tmp_path, listener_block("smtps", "submissions", **GATEWAY))
    b = Backend(load_config(cfg), proxy_timeout=0.5)
    await b.start()
    try:
        c = await RawSMTP.connect(b.bound_port("smtps"), prefix=encode_proxy_v2(("203.0.113.7", 40000), ("198.51.100.1", 465)))
        assert await c.closed_without_banner(timeout=5)  # liveness bound: the default is 10 s
        await wait_for(lambda: not b.sessions.sessions)
    finally:
        await b.stop(grace=0.5)
    # The session ended and was logged once (asyncio never reports a connection lost during a
    # handshake to the SMTP session: it used to wait on its reader for ever, held by the drain).
    assert caplog.text.count("TLS handshake failed") == 1
    assert len(re.findall(r"listener=smtps client=203\.0\.113\.7 outcome=(tls-failed|timeout)", caplog.text)) == 1


@pytest.mark.asyncio
async def test_failures_recorded_on_a_short_window_port_count_on_a_long_window_port(tmp_path):
    """Each listener judges the shared history over its own window, so a failure is kept for the
    longest window of any listener, not only that of the port where it happened."""
    cfg = write_config(
        tmp_path,
        listener_block("smtps", "submissions", auth_max_failures=10, auth_failure_delay=0, auth_failure_window=60)
        + listener_block("submission", "submission", auth_max_failures=4, auth_failure_delay=0, auth_failure_window=600),
    )
    async with running_backend(cfg) as b:
        clock = [1000.0]
        b.auth_limiter.now = lambda: clock[0]
        c = await implicit_tls_session(b.bound_port("smtps"))
        for _ in range(3):
            assert (await c.cmd(f"AUTH PLAIN {BAD}")).startswith("535 5.7.8")
        clock[0] += 100  # past 465's window, well inside 587's
        assert (await c.cmd(f"AUTH PLAIN {BAD}")).startswith("535 5.7.8")
        c.close()
        # Four failures in 587's ten minutes: its limit.
        c = await starttls_session(b.bound_port("submission"))
        assert (await c.cmd(f"AUTH PLAIN {GOOD}")).startswith("421 4.7.0")


def _with_crc(header: bytes, at: int) -> bytes:
    return header[:at] + struct.pack("!I", google_crc32c.value(header)) + header[at + 4 :]


def _crc_cases() -> dict[str, tuple[bytes, bool]]:
    src, dst = ("203.0.113.7", 40123), ("198.51.100.1", 25)
    first = encode_proxy_v2(src, dst, tlvs=((PP2_TYPE_CRC32C, b"\0" * 4), (0x04, b"pad")))
    crc_at = 16 + 12 + 3  # fixed part, IPv4 address block, the TLV's type and length
    two = encode_proxy_v2(src, dst, tlvs=((PP2_TYPE_CRC32C, b"\0" * 4), (PP2_TYPE_CRC32C, b"\0" * 4)))
    short = encode_proxy_v2(src, dst, tlvs=((PP2_TYPE_CRC32C, b"\0" * 3),))
    overrun = bytearray(encode_proxy_v2(src, dst, tlvs=((0x04, b"abc"),)))
    overrun[-4:-3] = b"\x09"  # the TLV claims 9 bytes where the header holds 3 (low length byte)
    return {
        "no TLV": (encode_proxy_v2(src, dst), True),
        "other TLVs only": (encode_proxy_v2(src, dst, tlvs=((0x04, b"pad"),)), True),
        "checksum before another TLV": (_with_crc(first, crc_at), True),
        "checksum field left zero": (first, False),
        "two checksums": (_with_crc(two, crc_at), False),
        "checksum of 3 bytes": (short, False),
        "TLV longer than the header": (bytes(overrun), False),
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(_crc_cases()))
async def test_proxy_checksum_rules(case):
    """PROXY protocol 2.2.5 on parsed headers (aiosmtpd's parser, no socket): the CRC32C covers
    the whole header with its own field zeroed, wherever the TLV sits; a malformed TLV block or
    a second or wrongly sized checksum is refused."""
    header, expected = _crc_cases()[case]
    reader = asyncio.StreamReader()
    reader.feed_data(header)
    reader.feed_eof()
    parsed = await get_proxy(reader)
    assert parsed.valid
    assert proxy_checksum_ok(parsed) is expected
