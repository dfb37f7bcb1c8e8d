"""SMTP clients that vanish: one transaction script, cut at a chosen protocol step, the connection then closed with FIN or reset with RST; and the normal transaction whose 250 proves the server still works.

Theory of operation. A session is the script below, run step by step against a real socket:

    connect → [PROXY v2 header, direct clients only] → banner → EHLO → MAIL → RCPT → DATA (354)
            → body → "." (250) → QUIT (221)

``VANISH_STEPS`` names every point where a client may disappear, in script order. The client
performs everything before its step, then does the step's partial action (half a command, half a
body, a final dot whose reply it never reads, ...), then leaves: ``FIN`` shuts its sending side
down and closes (the server reads EOF, unread replies may still turn it into a RST, as in real
life), ``RST`` sets SO_LINGER 0 and closes (the server gets ECONNRESET). Every body carries its
tag in a Message-ID and in its last line, so a stored message can be checked to be whole.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from dataclasses import dataclass, field

from gateway.proxyv2 import encode_proxy_v2

FIN, RST = "fin", "rst"
CLOSE_MODES = (FIN, RST)

VANISH_STEPS = (
    "connect",  # before the banner (through the gateway: during its greet wait)
    "mid_proxy",  # direct only: half a PROXY v2 header
    "banner",  # after reading the banner, before any command
    "mid_command",  # half a command line, no CRLF
    "ehlo",  # after the EHLO reply
    "mail",  # after MAIL's 250
    "rcpt",  # after RCPT's 250
    "data",  # after DATA's 354
    "mid_data",  # half the body sent
    "dot",  # the final dot sent, its reply never read
    "dot_quit",  # final dot and QUIT in one write, nothing read (issue 11's reproduction)
    "pipelined",  # EHLO..DATA, body, dot, QUIT in one write after the banner, nothing read
    "after_250",  # the 250 read, no QUIT
    "quit",  # QUIT sent, 221 not read
    "after_221",  # a complete session
)
# Steps after which the message may have been committed (the client cannot know).
MAYBE_COMMITTED = frozenset({"dot", "dot_quit", "pipelined"})
# Steps where the client saw the 250: the message is acknowledged and must be delivered.
ACKNOWLEDGED = frozenset({"after_250", "quit", "after_221"})

PROXY_CLIENT = ("203.0.113.9", 40000)
PROXY_SERVER = ("198.51.100.1", 25)


def body(tag: str, sender: str, rcpts: list[str], size: int = 600) -> bytes:
    """A message whose Message-ID and last line carry ``tag`` (a truncated copy lacks the last line)."""
    head = (f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in rcpts[:3])}\r\nSubject: chaos {tag}\r\n"
            f"Message-ID: <{tag}@chaos.test>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n").encode()
    line = b"The quick brown fox jumps over the lazy dog; chaos is a ladder.\r\n"
    fill = line * max(1, (size - len(head)) // len(line))
    return head + fill + end_marker(tag)


def end_marker(tag: str) -> bytes:
    return f"end-of-message {tag}\r\n".encode()


@dataclass
class Outcome:
    step: str
    mode: str
    tag: str
    acknowledged: bool = False  # the client read "250" after its final dot
    reply_after_dot: str = ""
    error: str = ""  # what went wrong before the chosen step (a refusal, a reset by the server)
    replies: list[str] = field(default_factory=list)  # every reply the server sent, as read


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader, self.writer, self.timeout = reader, writer, timeout
        self.replies: list[str] = []

    async def reply(self) -> str:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not line:
                raise ConnectionError("closed by server" + (": " + " | ".join(lines) if lines else ""))
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                self.replies.append("\n".join(lines))
                return self.replies[-1]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def expect(self, data: bytes, code: str) -> str:
        await self.send(data)
        r = await self.reply()
        if not r.startswith(code):
            raise ConnectionError(f"expected {code} to {data[:40]!r}, got {r!r}")
        return r

    def vanish(self, mode: str) -> None:
        sock: socket.socket | None = self.writer.get_extra_info("socket")
        if mode == RST:
            try:
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:  # the server closed first and the transport already let go of the socket
                pass
            self.writer.transport.abort()
            return
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()  # FIN now, whatever unread replies do to the close later
        except OSError:
            pass
        self.writer.close()


async def session(port: int, step: str, mode: str, tag: str, *, sender: str, rcpts: list[str],
                  proxy: bool = False, size: int = 600, host: str = "127.0.0.1", ehlo: str = "chaos.client.test",
                  timeout: float = 20.0) -> Outcome:
    """Run the script up to ``step`` and vanish there with ``mode``. Never raises for network faults:
    they end up in ``Outcome.error`` (a refusal before the chosen step is a finding, not a crash)."""
    out = Outcome(step, mode, tag)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        out.error = f"connect: {e!r}"
        return out
    c = _Conn(reader, writer, timeout)
    msg = body(tag, sender, rcpts, size)
    try:
        await _script(c, out, step, msg, sender, rcpts, proxy, ehlo)
    except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        out.error = out.error or f"{type(e).__name__}: {e}"
    finally:
        c.vanish(mode)
        out.replies = c.replies
    return out


async def _script(c: _Conn, out: Outcome, step: str, msg: bytes, sender: str, rcpts: list[str], proxy: bool,
                  ehlo: str) -> None:
    if proxy:
        header = encode_proxy_v2(PROXY_CLIENT, PROXY_SERVER)
        if step == "mid_proxy":
            await c.send(header[: len(header) // 2])
            return
        await c.send(header)
    if step in ("connect", "mid_proxy"):
        return
    banner = await c.reply()
    if not banner.startswith("220"):
        raise ConnectionError(f"banner {banner!r}")
    if step == "banner":
        return
    if step == "mid_command":
        await c.send(f"EHLO {ehlo}"[:7].encode())
        return
    envelope = (f"EHLO {ehlo}\r\nMAIL FROM:<{sender}>\r\n".encode()
                + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts) + b"DATA\r\n")
    if step == "pipelined":
        await c.send(envelope + msg + b".\r\nQUIT\r\n")
        return
    await c.expect(f"EHLO {ehlo}\r\n".encode(), "250")
    if step == "ehlo":
        return
    await c.expect(f"MAIL FROM:<{sender}>\r\n".encode(), "250")
    if step == "mail":
        return
    for r in rcpts:
        await c.expect(f"RCPT TO:<{r}>\r\n".encode(), "250")
    if step == "rcpt":
        return
    await c.expect(b"DATA\r\n", "354")
    if step == "data":
        return
    if step == "mid_data":
        await c.send(msg[: len(msg) // 2])
        return
    if step == "dot":
        await c.send(msg + b".\r\n")
        return
    if step == "dot_quit":
        await c.send(msg + b".\r\nQUIT\r\n")
        return
    await c.send(msg + b".\r\n")
    out.reply_after_dot = await c.reply()
    out.acknowledged = out.reply_after_dot.startswith("250")
    if step == "after_250":
        return
    await c.send(b"QUIT\r\n")
    if step == "quit":
        return
    await c.reply()


async def normal_transaction(port: int, tag: str, *, sender: str, rcpts: list[str], proxy: bool = False,
                             host: str = "127.0.0.1", timeout: float = 10.0) -> tuple[str, float]:
    """A well-behaved session; returns (reply after the dot, seconds from connect to that reply).
    Raises on a refusal or timeout before the dot (the caller asserts)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    c = _Conn(reader, writer, timeout)
    try:
        if proxy:
            await c.send(encode_proxy_v2(PROXY_CLIENT, PROXY_SERVER))
        await c.reply()
        await c.expect(b"EHLO ok.client.test\r\n", "250")
        await c.expect(f"MAIL FROM:<{sender}>\r\n".encode(), "250")
        for r in rcpts:
            await c.expect(f"RCPT TO:<{r}>\r\n".encode(), "250")
        await c.expect(b"DATA\r\n", "354")
        await c.send(body(tag, sender, rcpts) + b".\r\n")
        reply = await c.reply()
        elapsed = time.monotonic() - t0
        try:
            await c.expect(b"QUIT\r\n", "221")
        except (OSError, ConnectionError, asyncio.TimeoutError):
            pass
        return reply, elapsed
    finally:
        c.vanish(FIN)


def random_step(rng: random.Random, proxy: bool) -> str:
    steps = [s for s in VANISH_STEPS if proxy or s != "mid_proxy"]
    return rng.choice(steps)
