"""A relayed session holds two descriptors, its two sockets, whatever the open-files limit (issue 17):
the one-task relay waits on the run's shared epoll (gateway.relaypoll), not on one of its own, so it
is used at any limit and a tight limit no longer pushes the gateway back to two pump tasks."""

from __future__ import annotations

import gc
import os
import socket
from functools import partial

import pytest
import trio

from gateway.proxy import Gateway
from tests.lab.gateway import bound, gateway_config, running

SESSIONS = 40


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def held_upstream(task_status=trio.TASK_STATUS_IGNORED):
    """A TCP upstream that accepts and keeps every connection open, silent."""
    held = []

    async def hold(stream):
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        listeners = await n.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
        task_status.started(listeners[0].socket.getsockname()[1])


@pytest.mark.trio
async def test_idle_relayed_sessions_hold_two_descriptors_each_and_use_the_one_task_relay(monkeypatch):
    relays = []
    real_relay = Gateway._relay

    async def relay_spy(self, *a):
        relays.append(1)
        return await real_relay(self, *a)

    monkeypatch.setattr(Gateway, "_relay", relay_spy)
    async with trio.open_nursery() as n:
        up_port = await n.start(held_upstream)
        cfg = gateway_config({"name": "imaps", "kind": "tcp", "listen": "127.0.0.1:0",
                              "upstream": f"127.0.0.1:{up_port}", "max_per_client": 100, "rate": 1000,
                              "burst": 100})
        async with running(cfg) as gw:
            _, port = bound(gw, "imaps")
            clients = []
            try:
                for _ in range(3):  # warm up: the shared poll and the first sessions' allocations
                    clients.append(socket.create_connection(("127.0.0.1", port)))
                with trio.fail_after(10):
                    while len(relays) < 3:
                        await trio.sleep(0.01)
                # Only this test's descriptors may change in the window: earlier tests' garbage is
                # collected now, and no collection closes any of it while we count.
                gc.collect()
                gc.disable()
                before = open_fds()
                for _ in range(SESSIONS):
                    clients.append(socket.create_connection(("127.0.0.1", port)))
                with trio.fail_after(10):
                    while len(relays) < SESSIONS + 3:
                        await trio.sleep(0.01)
                await trio.sleep(0.1)
                # Per session: the client's own socket (this process), the gateway's accepted and
                # upstream sockets, and the held upstream's accepted socket.
                per_session = (open_fds() - before) / SESSIONS
                assert per_session == 4, per_session
                # Relayed through the sockets, not the two-pump splice.
                assert len(relays) == SESSIONS + 3
                for c in clients[:2]:  # the relay still moves data both ways and ends on FIN
                    c.shutdown(socket.SHUT_WR)
            finally:
                gc.enable()
                for c in clients:
                    c.close()
        n.cancel_scope.cancel()


async def echo_upstream(task_status=trio.TASK_STATUS_IGNORED):
    """A TCP upstream that echoes every chunk back until the client leaves."""

    async def echo(stream):
        try:
            while data := await stream.receive_some(4096):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as n:
        listeners = await n.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        task_status.started(listeners[0].socket.getsockname()[1])


@pytest.mark.trio
async def test_one_task_relay_traffic_pushes_back_the_idle_deadline_and_silence_ends_the_session(caplog):
    """Over real sockets (the one-task relay): echoes every 0.3 s keep a session with a 0.8 s idle
    timeout open for 1.5 s; then silence ends it as idle_timeout and the client sees the close."""
    caplog.set_level("INFO", logger="homemx.gateway")
    async with trio.open_nursery() as n:
        up_port = await n.start(echo_upstream)
        cfg = gateway_config({"name": "imaps", "kind": "tcp", "listen": "127.0.0.1:0",
                              "upstream": f"127.0.0.1:{up_port}", "idle_timeout": "0.8s", "proxy_v2": False})
        async with running(cfg) as gw:
            _, port = bound(gw, "imaps")
            client = await trio.open_tcp_stream("127.0.0.1", port)
            t0 = trio.current_time()
            for i in range(5):
                await client.send_all(b"ping %d\r\n" % i)
                with trio.fail_after(5):
                    assert await client.receive_some(100) == b"ping %d\r\n" % i
                await trio.sleep(0.3)
            assert trio.current_time() - t0 >= 1.5  # longer than the idle timeout, still open
            with trio.fail_after(5):
                assert await client.receive_some(100) == b""  # closed by the gateway after 0.8 s of silence
            assert trio.current_time() - t0 < 1.5 + 0.3 + 0.8 + 1.0
            await client.aclose()
            with trio.fail_after(5):
                while "outcome=idle_timeout" not in caplog.text:
                    await trio.sleep(0.01)
        n.cancel_scope.cancel()
