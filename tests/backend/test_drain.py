"""Sessions that end badly and a daemon that stops: a client vanishing right after the final dot
(its message is stored whole or not at all, and the next client is served), and the draining
shutdown (421 4.3.2 to idle sessions, a DATA in progress finishes, listeners refuse new clients).
The backend runs in-process on loopback ports chosen by the OS."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from backend.config import load_config
from backend.queue.store import Queue
from backend.run import Backend
from tests.backend.helpers import ALICE, RawSMTP, listener_block, write_config

MSG = b"From: carol@remote.example\r\nTo: alice@example.org\r\nSubject: s\r\n\r\n"


def queue_rows(b: Backend):
    return Queue(b.config.queue_db, group_commit=False).list(None)


def stored(b: Backend, qid: str) -> bytes:
    return Queue(b.config.queue_db, group_commit=False).content(qid)


async def start_backend(tmp_path, **kw) -> Backend:
    cfg = write_config(tmp_path, listener_block("mx", "mx"), **kw)
    b = Backend(load_config(cfg))
    await b.start()
    return b


async def open_transaction(port: int) -> RawSMTP:
    """A session that has just been told 354."""
    c = await RawSMTP.connect(port)
    assert (await c.reply()).startswith("220")
    await c.cmd("EHLO sender.example")
    assert (await c.cmd("MAIL FROM:<carol@remote.example>")).startswith("250")
    assert (await c.cmd("RCPT TO:<alice@example.org>")).startswith("250")
    assert (await c.cmd("DATA")).startswith("354")
    return c


async def normal_transaction(port: int, marker: bytes) -> str:
    c = await open_transaction(port)
    reply = await c.cmd(MSG + marker + b"\r\n.\r\n")
    await c.cmd("QUIT")
    c.close()
    return reply


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["rst", "fin"])
@pytest.mark.parametrize("size", [200, 400_000], ids=["small", "spooled"])
async def test_client_vanishing_after_the_dot_leaves_whole_messages_and_the_server_serving(tmp_path, how, size):
    """Issue 11 point 1: body + "." + QUIT, then the client closes (RST or FIN) without reading.
    aiosmtpd cancels the session while the message is being committed; the commit must neither be
    torn nor take the queue writer down with it."""
    b = await start_backend(tmp_path)
    try:
        port = b.bound_port("mx")
        rounds = 8
        for i in range(rounds):
            c = await open_transaction(port)
            sock = c.writer.get_extra_info("socket")
            if how == "rst":
                # SO_LINGER 0: close() sends RST at once.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            body = MSG + b"x" * size + b"\r\nEND-%d\r\n" % i
            c.writer.write(body + b".\r\nQUIT\r\n")
            if how == "fin":
                c.writer.write_eof()
            c.writer.close()
        # The server is still serving: a normal transaction is answered within a second.
        reply = await asyncio.wait_for(normal_transaction(port, b"after the chaos"), 1.0)
        assert reply.startswith("250 2.0.0 OK: queued as"), reply
        rows = queue_rows(b)
        assert 1 <= len(rows) <= rounds + 1
        for row in rows:
            # Each stored message is complete: recipients recorded, body up to its last line.
            assert [r.address for r in row.recipients] == [ALICE]
            content = stored(b, row.id)
            assert content.endswith(b"after the chaos\r\n") or content.rstrip().split(b"\r\n")[-1].startswith(b"END-")
            assert row.size == len(content)
    finally:
        await b.stop(grace=2)
    # No spooled body was left without its record (nor a half-written one).
    spool = b.config.queue_db.parent / "spool"
    ids = {r.id for r in queue_rows(b)}
    assert {f.name for f in spool.glob("*")} <= ids


@pytest.mark.asyncio
async def test_stop_sends_421_to_idle_sessions_and_lets_data_finish(tmp_path):
    """Issue 11 point 5: stop drains. An idle session gets 421 4.3.2 at once; a session in DATA
    finishes within the grace, its message is committed and answered 250, then 421; new clients
    are refused while the drain lasts."""
    b = await start_backend(tmp_path)
    port = b.bound_port("mx")
    idle = await RawSMTP.connect(port)
    await idle.reply()
    await idle.cmd("EHLO idle.example")
    busy = await open_transaction(port)
    await busy.send(MSG + b"first half\r\n")
    stopping = asyncio.create_task(b.stop(grace=10))
    # The idle session is told at once.
    assert (await idle.reply(timeout=5)).startswith("421 4.3.2")
    assert await idle.closed_without_banner()
    # The listener is closed: a new client is refused (or closed without a banner).
    try:
        late = await RawSMTP.connect(port)
    except ConnectionRefusedError:
        pass
    else:
        assert await late.closed_without_banner()
    assert not stopping.done()  # the DATA session holds the drain open
    await busy.send(b"second half\r\n.\r\n")
    reply = await busy.reply(timeout=5)
    assert reply.startswith("250 2.0.0 OK: queued as"), reply
    assert (await busy.reply(timeout=5)).startswith("421 4.3.2")
    await asyncio.wait_for(stopping, 10)
    [row] = queue_rows(b)
    assert row.id == reply.rsplit(" ", 1)[1]
    assert stored(b, row.id).endswith(b"first half\r\nsecond half\r\n")


@pytest.mark.asyncio
async def test_stop_cuts_a_data_that_outlasts_the_grace_and_stores_nothing(tmp_path):
    b = await start_backend(tmp_path)
    busy = await open_transaction(b.bound_port("mx"))
    await busy.send(MSG + b"the rest never comes\r\n")
    await asyncio.wait_for(b.stop(grace=0.3), 10)
    assert (await busy.reply(timeout=5)).startswith("421 4.3.2")
    assert queue_rows(b) == []


@pytest.mark.asyncio
async def test_pipelined_commands_after_the_dot_are_not_run_during_shutdown(tmp_path):
    b = await start_backend(tmp_path)
    busy = await open_transaction(b.bound_port("mx"))
    stopping = asyncio.create_task(b.stop(grace=10))
    await asyncio.sleep(0)  # the drain has begun
    await busy.send(MSG + b"body\r\n.\r\nMAIL FROM:<carol@remote.example>\r\nRCPT TO:<alice@example.org>\r\n")
    assert (await busy.reply(timeout=5)).startswith("250 2.0.0 OK: queued as")
    assert (await busy.reply(timeout=5)).startswith("421 4.3.2")
    assert await busy.closed_without_banner()
    await asyncio.wait_for(stopping, 10)
    assert len(queue_rows(b)) == 1
