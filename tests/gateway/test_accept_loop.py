"""The gateway's own accept loop (issue 17, B8): every queued connection is served, a batch at a
time, and the PROXY v2 header names the address the client really reached, also on a listener
bound to a wildcard address (where the loop cannot use the bound address)."""

from __future__ import annotations

import socket
from functools import partial

import pytest
import trio

from gateway import proxy
from gateway.proxy import Gateway
from tests.lab.gateway import gateway_config
from tests.lab.proxyv2_decoder import parse_proxy_v2

BANNER = b"220 upstream ready\r\n"


async def header_upstream(headers: list, task_status=trio.TASK_STATUS_IGNORED):
    """Reads each connection's PROXY v2 header into ``headers``, answers with a banner, holds it open."""

    async def serve(stream):
        data = b""
        while (parsed := parse_proxy_v2(data)) is None:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        headers.append(parsed[0])
        await stream.send_all(BANNER)
        await trio.sleep_forever()

    async with trio.open_nursery() as n:
        listeners = await n.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        task_status.started(listeners[0].socket.getsockname()[1])


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = s.recv(100)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


@pytest.mark.trio
@pytest.mark.parametrize("listen", ["127.0.0.1:0", "0.0.0.0:0"])
async def test_queued_connections_are_all_served_in_batches_with_their_real_addresses(listen, monkeypatch):
    monkeypatch.setattr(proxy, "ACCEPT_BATCH", 4)  # 10 queued connections: full batches, then a partial one
    headers: list = []
    async with trio.open_nursery() as n:
        up_port = await n.start(header_upstream, headers)
        cfg = gateway_config({"name": "mx", "kind": "smtp", "listen": listen, "upstream": f"127.0.0.1:{up_port}",
                              "proxy_v2": True, "greet_wait": 0, "max_per_client": 100, "rate": 1000,
                              "burst": 100})
        gw = Gateway(cfg)
        await gw.bind()
        port = gw.listeners["mx"].bound[0][1]
        # Queued in the kernel before the gateway accepts anything.
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        try:
            await n.start(gw.serve)
            for c in clients:
                c.settimeout(10)
            banners = await trio.to_thread.run_sync(lambda: [read_line(c) for c in clients])
            assert banners == [BANNER] * 10
            assert sorted(h.src for h in headers) == sorted(c.getsockname() for c in clients)
            assert {h.dst for h in headers} == {("127.0.0.1", port)}
        finally:
            for c in clients:
                c.close()
            gw.request_drain()
        n.cancel_scope.cancel()
