"""The gateway in a test's trio nursery: a config built through the real loader, ``running`` for the block, the
addresses its listeners bound, its metrics read and awaited, and the first line a server sends."""

from __future__ import annotations

import socket
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from gateway.config import config_from_dict
from gateway.proxy import Gateway

HOST = "mx.example.org"


def gateway_config(*listeners, **server):
    raw = {"server": {"hostname": HOST, "shutdown_grace": "1s", **server}, "listener": list(listeners)}
    return config_from_dict(raw, Path("integration.toml"))


@asynccontextmanager
async def running(config, **kwargs):
    gw = Gateway(config, **kwargs)
    async with trio.open_nursery() as n:
        await n.start(gw.serve)
        yield gw
        gw.request_drain()
        n.cancel_scope.cancel()


def bound(gw, name, family=socket.AF_INET):
    for host, port in gw.listeners[name].bound:
        if (":" in host) == (family == socket.AF_INET6):
            return host, port
    raise LookupError(name)


def sample(gw, name, **labels) -> float | None:
    """One series of the gateway's registry through prometheus_client's public API (None when absent)."""
    return gw.metrics.registry.get_sample_value(name, labels)


async def wait_sample(gw, name, value, timeout=10.0, **labels) -> None:
    """Wait until a series reaches ``value`` (a real socket's progress shows only in the metrics)."""
    with trio.fail_after(timeout):
        while sample(gw, name, **labels) != value:
            await trio.sleep(0.01)


def smtp_banner(host, port):
    with socket.create_connection((host, port), timeout=20) as s:
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data
